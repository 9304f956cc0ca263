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
from trainlab.optim import build_optimizer
from trainlab.runner import Runner
from trainlab.schedulers import build_scheduler, expression, simulate

EPOCHS, BATCHES = 7, 3
TOTAL = EPOCHS * BATCHES

# option → (overrides, the same schedule written with torch directly)
CASES = {
    "steplr": ([], lambda o: S.StepLR(o, step_size=5, gamma=0.5)),
    "multisteplr": ([], lambda o: S.MultiStepLR(o, [5, 8], gamma=0.1)),
    "exponentiallr": ([], lambda o: S.ExponentialLR(o, gamma=0.9)),
    "cosine": ([], lambda o: S.CosineAnnealingLR(o, T_max=EPOCHS)),
    "cosine_warm_restarts": ([], lambda o: S.CosineAnnealingWarmRestarts(o, T_0=5)),
    "lambdalr": (["scheduler.lr_lambda='0.5 ** (epoch // 2)'"],
                 lambda o: S.LambdaLR(o, lambda epoch: 0.5 ** (epoch // 2))),
    "multiplicative": ([], lambda o: S.MultiplicativeLR(o, lambda epoch: 0.95)),
    "plateau": (["scheduler.patience=0"],
                lambda o: S.ReduceLROnPlateau(o, mode="max", factor=0.1, patience=0)),
    "cycliclr": (["scheduler.step_size_up=4"], lambda o: S.CyclicLR(
        o, base_lr=1e-4, max_lr=1e-2, step_size_up=4, cycle_momentum=False)),
    "onecycle": ([], lambda o: S.OneCycleLR(
        o, max_lr=1e-2, total_steps=TOTAL, pct_start=0.3, cycle_momentum=False)),
    "warmup_cosine": ([], lambda o: S.SequentialLR(o, [
        S.LinearLR(o, 0.01, 1.0, total_iters=2), S.CosineAnnealingLR(o, TOTAL - 2)],
        milestones=[2])),
    "chained": ([], lambda o: S.ChainedScheduler(
        [S.ConstantLR(o, 0.5, total_iters=2), S.ExponentialLR(o, 0.9)])),
}
PER_BATCH = {"cycliclr", "onecycle", "warmup_cosine"}


def batches(seed: int, sizes=(8, 8, 5)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
            for n in sizes]


def fit(compose, tmp_path, option, overrides=()):
    cfg = compose(f"scheduler={option}", f"trainer.max_epochs={EPOCHS}", *overrides)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = build_optimizer(cfg.optimizer, model, "adam")
    scheduled = build_scheduler(cfg.scheduler, optimizer, option, BATCHES, EPOCHS)
    tracker = RecordingTracker(log_every_n_steps=2)
    runner = Runner(
        model, nn.CrossEntropyLoss(), optimizer, batches(1), batches(2, (6, 4)), tracker,
        tmp_path / "checkpoints", scheduler=scheduled, max_epochs=EPOCHS, progress_bar=False,
        metrics=TaskMetrics("classification", 3),
    )
    result = runner.fit()
    return runner, tracker, result


def per_step(history):
    """Expand (step, lrs) change points into the lr used at each training step."""
    lrs, changes = [], list(history)
    for step in range(TOTAL):
        while len(changes) > 1 and changes[1][0] <= step:
            changes.pop(0)
        lrs.append(changes[0][1][0])
    return lrs


@pytest.mark.parametrize("option", CASES)
def test_runner_steps_each_scheduler_as_torch_does(compose, tmp_path, option):
    overrides, make = CASES[option]
    runner, tracker, result = fit(compose, tmp_path, option, overrides)

    optimizer = torch.optim.Adam(nn.Linear(4, 3).parameters(), lr=1e-3)
    scheduler = make(optimizer)
    expected = []
    for epoch in range(EPOCHS):
        for _ in range(BATCHES):
            expected.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if option in PER_BATCH:
                scheduler.step()
        if option == "plateau":
            scheduler.step(result.history[epoch]["val/acc"])
        elif option not in PER_BATCH:
            scheduler.step()

    got = per_step(runner.lr.history)
    assert got == pytest.approx(expected, rel=1e-9)
    assert len(set(expected)) > 1, "the schedule under test never changes the lr"
    # logged to the tracker at every step it changes (and once per epoch), never twice a step
    logged = tracker.metrics["lr"]
    assert {(step, lrs[0]) for step, lrs in runner.lr.history} <= set(logged)
    assert len({step for step, _ in logged}) == len(logged)
    if option != "plateau":  # lr-plot steps the same schedule without training
        cfg = compose(f"scheduler={option}", f"trainer.max_epochs={EPOCHS}", *overrides)
        fresh = torch.optim.Adam(nn.Linear(4, 3).parameters(), lr=1e-3)
        scheduled = build_scheduler(cfg.scheduler, fresh, option, BATCHES, EPOCHS)
        simulated = [lrs[0] for lrs in simulate(scheduled, fresh, BATCHES, EPOCHS)]
        assert simulated == pytest.approx(expected, rel=1e-9)
    first_epoch = got[:BATCHES]
    assert (len(set(first_epoch)) > 1) == (option in PER_BATCH)
    assert any(path.endswith("lr_curve.png") for path in tracker.artifacts)


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
