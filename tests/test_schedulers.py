"""Every scheduler option: the runner's lr sequence equals torch's in a bare loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

from conftest import RecordingTracker
from trainlab.errors import TrainlabError
from trainlab.metrics import TaskMetrics
from trainlab.models.finetune import finetune
from trainlab.optim import build_optimizer
from trainlab.runner import Runner
from trainlab.schedulers import build_scheduler, expression, optimizer_steps, simulate

EPOCHS, BATCHES = 7, 6
SIZES = (8, 8, 8, 8, 8, 5)

# option → (overrides, the same schedule written with torch directly, given the number of
# optimizer steps in the run)
CASES = {
    "steplr": ([], lambda o, n: S.StepLR(o, step_size=5, gamma=0.5)),
    "multisteplr": ([], lambda o, n: S.MultiStepLR(o, [5, 8], gamma=0.1)),
    "exponentiallr": ([], lambda o, n: S.ExponentialLR(o, gamma=0.9)),
    "cosine": ([], lambda o, n: S.CosineAnnealingLR(o, T_max=EPOCHS)),
    "cosine_warm_restarts": ([], lambda o, n: S.CosineAnnealingWarmRestarts(o, T_0=5)),
    "lambdalr": (["scheduler.lr_lambda='0.5 ** (epoch // 2)'"],
                 lambda o, n: S.LambdaLR(o, lambda epoch: 0.5 ** (epoch // 2))),
    "multiplicative": ([], lambda o, n: S.MultiplicativeLR(o, lambda epoch: 0.95)),
    "plateau": (["scheduler.patience=0"],
                lambda o, n: S.ReduceLROnPlateau(o, mode="max", factor=0.1, patience=0)),
    "cycliclr": (["scheduler.step_size_up=4"], lambda o, n: S.CyclicLR(
        o, base_lr=1e-4, max_lr=1e-2, step_size_up=4, cycle_momentum=False)),
    "onecycle": ([], lambda o, n: S.OneCycleLR(
        o, max_lr=1e-2, total_steps=n, pct_start=0.3, cycle_momentum=False)),
    "warmup_cosine": ([], lambda o, n: S.SequentialLR(o, [
        S.LinearLR(o, 0.01, 1.0, total_iters=round(0.1 * n)),
        S.CosineAnnealingLR(o, n - round(0.1 * n))], milestones=[round(0.1 * n)])),
    "chained": ([], lambda o, n: S.ChainedScheduler(
        [S.ConstantLR(o, 0.5, total_iters=2), S.ExponentialLR(o, 0.9)])),
}
PER_BATCH = {"cycliclr", "onecycle", "warmup_cosine"}




def batches(seed: int, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
            for n in sizes]


def tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("head", nn.Linear(4, 3))
    return model


def fit(compose, tmp_path, option, overrides=(), accumulate=1, unfreeze_at=None):
    """The real loop, built as train.py builds it: optimizer, scheduler, fine-tune callbacks."""
    cfg = compose(f"scheduler={option}", f"trainer.max_epochs={EPOCHS}", *overrides)
    model, callbacks = finetune(tiny_model(), freeze=["body.*"] if unfreeze_at else None,
                                unfreeze_at_epoch=unfreeze_at)
    optimizer = build_optimizer(cfg.optimizer, model, "adam")
    scheduled = build_scheduler(cfg.scheduler, optimizer, option,
                                optimizer_steps(BATCHES, accumulate), EPOCHS)
    tracker = RecordingTracker(log_every_n_steps=2)
    runner = Runner(
        model, nn.CrossEntropyLoss(), optimizer, batches(1), batches(2, (6, 4)), tracker,
        tmp_path / "checkpoints", scheduler=scheduled, max_epochs=EPOCHS, progress_bar=False,
        metrics=TaskMetrics("classification", 3), callbacks=callbacks,
        accumulate_grad_batches=accumulate,
    )
    result = runner.fit()
    return runner, tracker, result


def per_step(history, name=None):
    """Expand (step, {name: lr}) change points into the lr of one group at each batch
    (the first group by default; None before the group exists)."""
    lrs, changes = [], list(history)
    for step in range(EPOCHS * BATCHES):
        while len(changes) > 1 and changes[1][0] <= step:
            changes.pop(0)
        row = changes[0][1]
        lrs.append(row.get(name) if name else next(iter(row.values())))
    return lrs


def by_hand(option, make, accumulate, history):
    """torch's own scheduler over a bare optimizer, stepped where an optimizer step happens:
    the lr at every batch."""
    optimizer = torch.optim.Adam(nn.Linear(4, 3).parameters(), lr=1e-3)
    scheduler = make(optimizer, EPOCHS * optimizer_steps(BATCHES, accumulate))
    expected = []
    for epoch in range(EPOCHS):
        for index in range(BATCHES):
            expected.append(optimizer.param_groups[0]["lr"])
            if (index + 1) % accumulate == 0 or index + 1 == BATCHES:
                optimizer.step()
                if option in PER_BATCH:
                    scheduler.step()
        if option == "plateau":
            scheduler.step(history[epoch]["val/acc"])
        elif option not in PER_BATCH:
            scheduler.step()
    return expected


@pytest.mark.parametrize("unfreeze_at", [
    None, pytest.param(1, marks=pytest.mark.slow)], ids=["frozen-never", "unfreeze-at-1"])
@pytest.mark.parametrize("accumulate", [
    1, pytest.param(4, marks=pytest.mark.slow)], ids=["accumulate-1", "accumulate-4"])
@pytest.mark.parametrize("option", CASES)
def test_runner_steps_each_scheduler_as_torch_does(compose, tmp_path, option, accumulate,
                                                   unfreeze_at):
    overrides, make = CASES[option]
    start = tiny_model().body.weight.detach().clone()
    runner, tracker, result = fit(compose, tmp_path, option, overrides, accumulate, unfreeze_at)
    expected = by_hand(option, make, accumulate, result.history)

    got = per_step(runner.lr.history)
    assert got == pytest.approx(expected, rel=1e-9)
    assert len(set(expected)) > 1, "the schedule under test never changes the lr"
    if option in ("onecycle", "warmup_cosine", "cosine"):  # the run ends at the floor
        assert expected[-1] < 1e-3 * 0.05
    if unfreeze_at:  # the unfrozen layers follow the same schedule from then on, and train
        unfrozen = per_step(runner.lr.history, "lr/unfrozen")
        assert unfrozen[: BATCHES * unfreeze_at] == [None] * BATCHES * unfreeze_at
        assert unfrozen[BATCHES * unfreeze_at :] == pytest.approx(
            expected[BATCHES * unfreeze_at :], rel=1e-9)
        assert not torch.equal(runner.model.body.weight, start)
        assert {"lr", "lr/unfrozen"} <= set(tracker.metrics)  # the lr series goes on
        assert "lr/backbone" not in tracker.metrics
    else:
        # logged to the tracker at every step it changes (and once per epoch), never twice
        logged = tracker.metrics["lr"]
        assert {(step, lrs["lr"]) for step, lrs in runner.lr.history} <= set(logged)
        assert len({step for step, _ in logged}) == len(logged)
        assert max(logged)[1] == pytest.approx(expected[-1], rel=1e-9)  # the last step's lr,
        # not the one a scheduler stepped past the run's end would give a step never taken
    if option != "plateau":  # lr-plot steps the same schedule, unfreezing included
        cfg = compose(f"scheduler={option}", f"trainer.max_epochs={EPOCHS}", *overrides)
        model, unfreezing = finetune(tiny_model(), freeze=["body.*"] if unfreeze_at else None,
                                     unfreeze_at_epoch=unfreeze_at)
        fresh = build_optimizer(cfg.optimizer, model, "adam")
        scheduled = build_scheduler(cfg.scheduler, fresh, option,
                                    optimizer_steps(BATCHES, accumulate), EPOCHS)
        rows = simulate(scheduled, fresh, BATCHES, EPOCHS, accumulate=accumulate,
                        callbacks=unfreezing)
        assert [row["lr"] for row in rows] == pytest.approx(expected, rel=1e-9)
        if unfreeze_at:
            joined = [row.get("lr/unfrozen") for row in rows]
            cut = BATCHES * unfreeze_at
            assert joined[:cut] == [None] * cut
            assert joined[cut:] == pytest.approx(unfrozen[cut:], rel=1e-9)
    first_epoch = got[:BATCHES]
    assert (len(set(first_epoch)) > 1) == (option in PER_BATCH)
    assert any(path.endswith("lr_curve.png") for path in tracker.artifacts)


@pytest.mark.parametrize("option", ["onecycle", "warmup_cosine", "cosine"])
def test_an_epoch_interval_still_ends_at_the_floor(compose, option):
    cfg = compose(f"scheduler={option}", "++scheduler.interval=epoch")
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1e-3)
    scheduled = build_scheduler(cfg.scheduler, optimizer, option, 50, 6)
    lrs = [row["lr"] for row in simulate(scheduled, optimizer, 50, 6)]
    assert scheduled.interval == "epoch" and len(set(lrs[:50])) == 1
    assert lrs[-1] < 1e-3 * 0.1 and lrs[-1] < lrs[-51]


@pytest.mark.parametrize("option, overrides", [("onecycle", []),
                                               ("cycliclr", ["scheduler.step_size_up=5"])])
def test_cyclic_peaks_follow_each_groups_lr(compose, option, overrides):
    cfg = compose(f"scheduler={option}", "optimizer.head_lr=1e-2", "optimizer.head=[head.*]",
                  *overrides)
    optimizer = build_optimizer(cfg.optimizer, tiny_model(), "adam")
    scheduled = build_scheduler(cfg.scheduler, optimizer, option, 10, 3)
    rows = simulate(scheduled, optimizer, 10, 3)
    peaks = {name: max(row[name] for row in rows) for name in rows[0]}
    assert peaks["lr/head"] == pytest.approx(10 * peaks["lr/backbone"])
    assert peaks["lr/backbone"] == pytest.approx(1e-2, rel=0.05)


def test_param_groups_each_get_their_lr_logged(compose, tmp_path):
    cfg = compose("scheduler=onecycle", "optimizer.head_lr=1e-2", "optimizer.head=[head.*]",
                  "optimizer.no_decay_norm_bias=true")
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("head", nn.Linear(4, 3))
    optimizer = build_optimizer(cfg.optimizer, model, "adam")
    scheduled = build_scheduler(cfg.scheduler, optimizer, "onecycle", BATCHES, 2)
    tracker = RecordingTracker(log_every_n_steps=2)
    Runner(model, nn.CrossEntropyLoss(), optimizer, batches(1), batches(2), tracker,
           tmp_path, scheduler=scheduled, max_epochs=2, progress_bar=False).fit()
    assert {key for key in tracker.metrics if key.startswith("lr")} == {
        "lr/backbone", "lr/backbone_no_decay", "lr/head", "lr/head_no_decay"}


def test_onecycle_total_steps_come_from_the_loader_and_epochs(compose):
    cfg = compose("scheduler=onecycle")
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    assert build_scheduler(cfg.scheduler, optimizer, "onecycle", 23, 10).scheduler.total_steps \
        == 230


def test_lr_lambda_expressions_are_arithmetic_only():
    assert expression("0.1 ** (epoch // 30)", "epoch")(65) == pytest.approx(0.01)
    assert expression("math.cos(epoch)", "epoch")(0) == 1.0
    assert math.isclose(expression(0.95, "epoch")(3), 0.95)
    with pytest.raises(TrainlabError, match=r"uses \['open'\]"):
        expression("open('x')", "epoch")


def test_plateau_cannot_step_per_batch(compose):
    cfg = compose("scheduler=plateau", "+scheduler.interval=step")
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(TrainlabError, match="set scheduler.interval=epoch"):
        build_scheduler(cfg.scheduler, optimizer, "plateau")
