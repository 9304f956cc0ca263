"""The course's segmentation worked examples, run as a user would: `trainlab train experiment=…`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import runs_of


def _write_carvana_layout(root, count=12, size=40):
    """Car-like blobs in the Carvana layout: train/NAME.jpg and train_masks/NAME_mask.gif."""
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    (root / "train_masks").mkdir()
    for index in range(count):
        mask = np.zeros((size, size), np.uint8)
        top, left = rng.integers(2, size // 2, 2)
        mask[top : top + size // 3, left : left + size // 2] = 255
        image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        image[mask > 0] = (200, 40, 40)
        Image.fromarray(image).save(root / "train" / f"car{index}.jpg")
        Image.fromarray(mask).save(root / "train_masks" / f"car{index}_mask.gif")


def test_carvana_recipe_runs_on_files_in_its_layout(run_trainlab, mlflow_client, tmp_path):
    _write_carvana_layout(tmp_path / "carvana")
    run_trainlab(
        "train", "experiment=carvana_unet", f"data.dataset.root={tmp_path / 'carvana'}",
        "data.image_size=[32,32]", "data.batch_size=4", "data.num_workers=0",
        "model.base_channels=4", "model.depth=2", "trainer.max_epochs=2",
        "trainer.progress_bar=false",
    )
    (run,) = runs_of(mlflow_client, "carvana_unet")
    assert run.info.status == "FINISHED"
    assert run.data.params["loss"] == "bce_logits"
    dice = [m.value for m in sorted(mlflow_client.get_metric_history(run.info.run_id, "val/dice"),
                                    key=lambda m: m.step)]
    assert len(dice) == 2 and all(0.0 <= value <= 1.0 for value in dice)
    # the recipe monitors val/dice: the logged model is the epoch with the best Dice
    assert run.data.tags["trainlab.model_epoch"] == str(dice.index(max(dice)) + 1)
    history = mlflow_client.get_metric_history(run.info.run_id, "lr")
    assert sorted({round(m.value, 6) for m in history}, reverse=True)[:2] == [0.001, 0.0008]


@pytest.mark.slow
def test_shapes_unet_dice_reaches_the_promised_dice(run_trainlab, mlflow_client):
    run_trainlab("train", "experiment=shapes_unet_dice", "trainer.progress_bar=false",
                 "logger.log_model=none", timeout=1800)
    (run,) = runs_of(mlflow_client, "shapes_unet_dice")
    assert run.info.status == "FINISHED"
    best = max(m.value for m in mlflow_client.get_metric_history(run.info.run_id, "val/dice"))
    assert best >= 0.8


# Few batches per epoch, as on a laptop-sized subset: torch's BatchNorm running statistics
# are then mostly their starting values (mean 0, variance 1) for several epochs, and
# validation (eval mode) predicted all background unless each epoch's batches replace them.
FEW_BATCHES = ["loss=dice", "data.image_size=[32,32]", "data.batch_size=4",
               "model.base_channels=8", "model.depth=2", "trainer.max_epochs=5",
               "trainer.monitor=val/dice", "trainer.progress_bar=false", "logger.log_model=none",
               "logger.log_system_metrics=false"]


@pytest.mark.parametrize("source", ["carvana_files", "shapes"])
def test_unet_dice_validates_what_it_learns_from_the_first_epoch(
        trainlab_in_process, mlflow_client, tmp_path, source):
    if source == "carvana_files":
        _write_carvana_layout(tmp_path / "carvana", count=24, size=64)
        data = ["experiment=carvana_unet", f"data.dataset.root={tmp_path / 'carvana'}",
                "data.num_workers=0"]
        experiment = "carvana_unet"
    else:
        data = ["data=shapes", "model=unet", "data.dataset.n_train=32", "data.dataset.n_val=16"]
        experiment = "trainlab"
    trainlab_in_process("train", *data, *FEW_BATCHES)
    (run,) = runs_of(mlflow_client, experiment)
    history = sorted(mlflow_client.get_metric_history(run.info.run_id, "val/dice"),
                     key=lambda m: m.step)
    dice = [m.value for m in history]
    assert len(dice) == 5
    assert min(dice) > 0.1, dice  # no epoch validates a constant prediction
    assert dice[-1] > dice[0] and max(dice) >= 0.5, dice
    # compared by what the runs monitored, best first: their best Dice, not val/acc
    table = trainlab_in_process("runs", "--experiment", experiment).stdout.splitlines()
    assert table[0] == "val/dice: best and last value of each run"
    assert f"{max(dice):.4f}" in table[3]
