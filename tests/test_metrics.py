"""Task metrics over uneven batches (and DDP ranks) against scikit-learn / NumPy on all data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, jaccard_score, top_k_accuracy_score

from conftest import RecordingTracker, free_port
from trainlab.errors import TrainlabError
from trainlab.metrics import TaskMetrics, plot_confusion

SIZES = (7, 16, 3)  # uneven batches
N = sum(SIZES)


def split(tensor: torch.Tensor, sizes=SIZES):
    return torch.split(tensor, list(sizes))


def classification_data(seed=0, n=N, c=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


def segmentation_data(seed=0, n=N, c=3, ignore=255):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, c, (n, 6, 6), generator=g)
    targets[:, 0, :3] = ignore
    logits = torch.randn(n, 1 if c == 2 else c, 6, 6, generator=g)
    if c == 2:
        targets = torch.where(targets == ignore, ignore, targets.clamp(max=1)).unsqueeze(1)
    return logits, targets


def feed(totals, logits, targets):
    for out, tgt in zip(split(logits), split(targets), strict=True):
        totals.update(torch.tensor(1.0), out, tgt)
    return totals.compute()


def test_classification_metrics_over_uneven_batches_match_sklearn():
    logits, targets = classification_data()
    spec = TaskMetrics("classification", 10)
    val = feed(spec.val(), logits, targets)
    train = feed(spec.train(), logits, targets)
    y, pred = targets.numpy(), logits.argmax(1).numpy()
    assert val["acc"] == pytest.approx(accuracy_score(y, pred))
    assert train["acc"] == pytest.approx(accuracy_score(y, pred))
    assert val["acc_top5"] == pytest.approx(
        top_k_accuracy_score(y, logits.numpy(), k=5, labels=range(10)))
    assert val["f1_macro"] == pytest.approx(
        f1_score(y, pred, average="macro", labels=range(10), zero_division=0), rel=1e-5)
    assert sorted(f"val/{k}" for k in val) == sorted(
        n for n in spec.names() if n.startswith("val/"))


def reference_segmentation(logits, targets, ignore=255, binary=False):
    keep = targets.flatten() != ignore
    y = targets.flatten()[keep].numpy()
    if binary:
        pred = (logits.flatten() > 0)[keep].numpy().astype(int)
        return f1_score(y, pred), jaccard_score(y, pred)
    pred = logits.argmax(1).flatten()[keep].numpy()
    return (f1_score(y, pred, average="macro"), jaccard_score(y, pred, average="macro"))


@pytest.mark.parametrize("classes", [3, 2], ids=["multiclass", "binary"])
def test_segmentation_dice_and_iou_respect_ignore_index(classes):
    logits, targets = segmentation_data(c=classes)
    binary = classes == 2
    spec = TaskMetrics("segmentation", 1 if binary else classes, ignore_index=255)
    val = feed(spec.val(), logits, targets)
    train = feed(spec.train(), logits, targets)
    dice, iou = reference_segmentation(logits, targets, binary=binary)
    assert val["dice"] == pytest.approx(dice, rel=1e-5)
    assert val["iou"] == pytest.approx(iou, rel=1e-5)
    assert train["dice"] == pytest.approx(dice, rel=1e-5)  # cheap sums agree with torchmetrics
    assert sorted(f"val/{k}" for k in val) == sorted(
        n for n in spec.names() if n.startswith("val/"))


def test_monitor_must_name_a_computed_metric():
    with pytest.raises(TrainlabError) as err:
        TaskMetrics("classification", 10).check_monitor("val/dice")
    assert "trainer.monitor='val/dice'" in str(err.value)
    assert "'val/acc'" in str(err.value) and "'val/f1_macro'" in str(err.value)
    TaskMetrics("segmentation", 4).check_monitor("val/dice")
    with pytest.raises(TrainlabError, match="data.task='detection'"):
        TaskMetrics("detection", 3)


def test_confusion_matrix_is_counted_and_drawn(tmp_path):
    logits, targets = classification_data(c=4)
    totals = TaskMetrics("classification", 4).val()
    feed(totals, logits, targets)
    matrix = totals.confusion()
    expected = np.zeros((4, 4), int)
    np.add.at(expected, (targets.numpy(), logits.argmax(1).numpy()), 1)
    assert np.array_equal(matrix.numpy(), expected)
    path = plot_confusion(matrix, tmp_path / "confusion.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    logits, targets = segmentation_data(c=3)
    parts = [slice(0, 5), slice(5, N)]  # ranks see unequal shares
    spec = TaskMetrics("segmentation", 3, ignore_index=255)
    results = {}
    for name, totals in (("val", spec.val()), ("train", spec.train())):
        totals.update(torch.tensor(float(rank + 1)), logits[parts[rank]], targets[parts[rank]])
        results[name] = totals.compute()
    torch.save(results, f"{out}/{rank}.pt")
    dist.barrier()  # leave the group together: a rank tearing gloo down alone can abort
    dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_sum_over_ddp_ranks(tmp_path):
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    logits, targets = segmentation_data(c=3)
    dice, iou = reference_segmentation(logits, targets)
    loss = (1 * 5 + 2 * (N - 5)) / N  # per-sample mean over both ranks
    for rank in range(2):
        results = torch.load(tmp_path / f"{rank}.pt")
        assert results["val"]["dice"] == pytest.approx(dice, rel=1e-5)
        assert results["val"]["iou"] == pytest.approx(iou, rel=1e-5)
        assert results["train"]["dice"] == pytest.approx(dice, rel=1e-5)
        assert results["val"]["loss"] == pytest.approx(loss)
        assert results["train"]["loss"] == pytest.approx(loss)


def test_a_segmentation_run_monitors_dice(compose, tmp_path):
    """The runner on hand-made masks: dice/iou logged, plateau fed with val/dice."""
    from torch import nn

    from trainlab.losses import DiceLoss
    from trainlab.runner import Runner
    from trainlab.schedulers import build_scheduler

    logits, targets = segmentation_data(c=3)
    images = logits[:, :1]  # one input channel the model can learn from
    loader = list(zip(split(images), split(targets), strict=True))
    model = nn.Conv2d(1, 3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    cfg = compose("scheduler=plateau", "trainer.monitor=val/dice")
    tracker = RecordingTracker()
    result = Runner(
        model, DiceLoss(ignore_index=255), optimizer, loader, loader, tracker, tmp_path,
        scheduler=build_scheduler(cfg.scheduler, optimizer, "plateau"), max_epochs=2,
        monitor="val/dice", progress_bar=False,
        metrics=TaskMetrics("segmentation", 3, ignore_index=255),
    ).fit()
    assert {"train/dice", "val/dice", "val/iou", "val/acc"} <= set(tracker.metrics)
    assert result.best == max(epoch["val/dice"] for epoch in result.history)


def test_train_and_val_dice_agree_when_a_class_is_absent():
    """A perfect prediction of masks without class 2 scores 1.0 in training and validation."""
    targets = torch.randint(0, 2, (N, 6, 6), generator=torch.Generator().manual_seed(0))
    logits = 10.0 * torch.nn.functional.one_hot(targets, 3).permute(0, 3, 1, 2).float()
    spec = TaskMetrics("segmentation", 3)
    assert feed(spec.train(), logits, targets)["dice"] == pytest.approx(1.0)
    assert feed(spec.val(), logits, targets)["dice"] == pytest.approx(1.0)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_the_best_epochs_confusion_matrix_and_per_class_table(compose, tmp_path, task):
    import csv

    from trainlab.tracker import NullTracker
    from trainlab.train import fit

    overrides = ["model=mlp", "optimizer=sgd", "optimizer.lr=0.3"] if task == "classification" \
        else ["data=shapes", "data.dataset.n_train=32", "data.dataset.n_val=16", "model=unet",
              "model.base_channels=4", "model.depth=1", "data.image_size=[16,16]",
              "data.batch_size=8", "loss=dice", "trainer.monitor=val/dice"]
    cfg = compose(*overrides, "trainer.max_epochs=3", "trainer.progress_bar=false")
    result = fit(cfg, NullTracker.like(cfg.logger), tmp_path / "run", {})
    best = result.history[result.best_epoch]
    assert (tmp_path / "run/plots/confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((tmp_path / "run/plots/per_class.csv").open()))
    if task == "classification":
        assert [row["class"] for row in rows] == [str(i) for i in range(10)]  # digits' names
        support = np.array([int(row["support"]) for row in rows])
        recall = np.array([float(row["recall"]) for row in rows])
        # the table is the best epoch's: its recall over the support is that epoch's accuracy
        assert (recall * support).sum() / support.sum() == pytest.approx(best["val/acc"],
                                                                         abs=1e-3)
    else:
        assert [row["class"] for row in rows] == ["background", "shape"]
        assert float(rows[1]["dice"]) == pytest.approx(best["val/dice"], abs=1e-3)
