"""Every loss trains through the real loop on every task it claims to fit; the rest are refused.

The (loss, task) table is the code's own (``trainlab.losses.CONTRACTS``): a loss added there
is trained here without editing this file.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from trainlab.errors import TrainlabError
from trainlab.losses import BINARY, CLASSIFICATION, CONTRACTS, KINDS, SEGMENTATION

FAST = ["trainer.progress_bar=false", "trainer.max_epochs=2", "seed=0"]
TINY_UNET = ["model=unet", "model.base_channels=4", "model.depth=1", "data.image_size=[16,16]",
             "data.batch_size=8", "trainer.monitor=val/dice"]


def write_three_class_masks(root, n=12, size=16):
    """The Carvana layout: train/NAME.png and train_masks/NAME_mask.png with values 0, 1, 2."""
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    (root / "train_masks").mkdir()
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[: size // 2, : rng.integers(4, size)] = 1
        mask[size // 2 + 2 :, rng.integers(0, size - 4) :] = 2
        image = np.stack([mask * 100, (mask == 1) * 200, rng.integers(0, 40, mask.shape)], -1)
        Image.fromarray(image.astype(np.uint8)).save(root / "train" / f"s{i}.png")
        Image.fromarray(mask).save(root / "train_masks" / f"s{i}_mask.png")


def data_overrides(kind, tmp_path):
    if kind == CLASSIFICATION:
        return ["data=digits", "model=mlp"]
    if kind == BINARY:
        return ["data=shapes", "data.dataset.n_train=16", "data.dataset.n_val=8", *TINY_UNET]
    write_three_class_masks(tmp_path / "seg")
    return ["data=segmentation_folder", f"data.dataset.root={tmp_path / 'seg'}",
            "data.num_classes=3", "data.dataset.binarize=false", "data.num_workers=0",
            "data.persistent_workers=false", "data.pin_memory=false",
            "data.dataset.mask_name='{stem}_mask.png'", *TINY_UNET]


def fit_in_process(compose, tmp_path, loss, *overrides):
    from trainlab.tracker import NullTracker
    from trainlab.train import fit

    cfg = compose(*FAST, f"loss={loss}", *overrides)
    return fit(cfg, NullTracker.like(cfg.logger), tmp_path / "run", {"loss": loss})


PAIRS = [(c.name, kind) for c in CONTRACTS.values() for kind in KINDS if kind in c.kinds]
REFUSED = [(c.name, kind) for c in CONTRACTS.values() for kind in KINDS if kind not in c.kinds]


@pytest.mark.slow
@pytest.mark.parametrize("loss, kind", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_every_loss_trains_on_every_task_it_fits(compose, tmp_path, loss, kind):
    result = fit_in_process(compose, tmp_path, loss, *data_overrides(kind, tmp_path))
    for epoch in result.history:
        for name in ("train/loss_epoch", "val/loss"):
            # nll on raw logits, the old failure, gives negative losses
            assert math.isfinite(epoch[name]) and epoch[name] >= 0, (name, epoch[name])
    last = result.history[-1]
    if kind == CLASSIFICATION:
        assert last["val/acc"] > 0.5  # learning, not the 10 % of a broken contract
    else:
        assert last["train/loss_epoch"] < result.history[0]["train/loss_epoch"] or \
            last["val/dice"] > 0.3


@pytest.mark.parametrize("loss, kind", REFUSED, ids=[f"{a}-{b}" for a, b in REFUSED])
def test_every_loss_is_refused_in_one_line_where_it_does_not_fit(compose, tmp_path, loss, kind):
    overrides = {CLASSIFICATION: ["data=digits", "model=mlp"],
                 BINARY: ["data=shapes", *TINY_UNET],
                 SEGMENTATION: ["data=shapes", "data.num_classes=3", *TINY_UNET]}[kind]
    with pytest.raises(TrainlabError) as err:
        fit_in_process(compose, tmp_path, loss, *overrides)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"loss={loss} does not fit data.task=")
    assert loss not in message.split("losses that fit: ")[1].split(", ")


def test_focal_takes_one_alpha_per_class_or_one_number(compose, tmp_path):
    fit_in_process(compose, tmp_path, "focal", "model=mlp", "loss.alpha=0.25",
                   "trainer.max_epochs=1")
    alphas = [0.5] * 9 + [2.0]
    fit_in_process(compose, tmp_path, "focal", "model=mlp", f"loss.alpha={alphas}",
                   "trainer.max_epochs=1")
    with pytest.raises(TrainlabError, match=r"^loss=focal: alpha has 3 values but .* needs 10"):
        fit_in_process(compose, tmp_path, "focal", "model=mlp", "loss.alpha=[1,2,3]")


def test_dense_losses_refuse_an_ignore_index(compose, tmp_path):
    with pytest.raises(TrainlabError, match="loss=mse compares whole masks .* losses that can: "
                                            "ce, nll, focal, dice, iou, tversky, dice_bce"):
        fit_in_process(compose, tmp_path, "mse", "data=shapes", "data.num_classes=3",
                       "+data.ignore_index=255", *TINY_UNET)


def test_the_command_line_prints_the_refusal_as_one_line(run_trainlab):
    proc = run_trainlab("train", "loss=dice", "model=mlp", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: loss=dice does not fit data.task=classification with 10 classes "
        "(classification); losses that fit: ce, nll, focal, bce_logits, bce, l1, mse, "
        "smooth_l1, huber, kl_div")
    assert "Traceback" not in proc.stderr
