"""Learning-rate schedulers from config, and whether each steps per epoch or per batch.

Lengths the user should not have to type are derived from the run: a ``null``
``total_steps`` (OneCycleLR, warmup_cosine) or ``T_max`` (cosine) becomes the number of
times the scheduler will step: optimizer steps (batches / ``accumulate_grad_batches``) ×
``trainer.max_epochs`` per step, ``max_epochs`` per epoch. OneCycleLR's ``max_lr`` and
CyclicLR's ``base_lr``/``max_lr`` follow each param group's lr (``optimizer.head_lr``).
A param group added mid-run (gradual unfreezing) gets the scheduler's state of an
existing group (``add_param_group``).
"""

from __future__ import annotations

import ast
import copy
import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.optim import lr_scheduler

from trainlab.components import build
from trainlab.errors import TrainlabError

PER_BATCH = {"CyclicLR", "OneCycleLR"}
INTERVALS = ("epoch", "step")


@dataclass
class ScheduledLR:
    """A torch scheduler plus when the runner steps it (``epoch`` or ``step``)."""

    scheduler: lr_scheduler.LRScheduler | lr_scheduler.ReduceLROnPlateau
    interval: str

    @property
    def needs_metric(self) -> bool:
        return isinstance(self.scheduler, lr_scheduler.ReduceLROnPlateau)

    def step(self, metric: float | None = None) -> None:
        if self.needs_metric:
            self.scheduler.step(metric)
        else:
            self.scheduler.step()


def optimizer_steps(batches: int, accumulate: int = 1) -> int:
    """Optimizer steps in an epoch of ``batches``: the last, partial accumulation steps too."""
    return math.ceil(batches / max(1, int(accumulate)))


def build_scheduler(
    node: DictConfig,
    optimizer: torch.optim.Optimizer,
    choice: str | None = None,
    steps_per_epoch: int = 1,
    max_epochs: int = 1,
) -> ScheduledLR | None:
    """The scheduler of config ``node`` for ``optimizer``; ``None`` when ``_target_`` is null.

    ``steps_per_epoch`` counts optimizer steps (see ``optimizer_steps``).
    """
    if node is None or node.get("_target_") is None:
        return None
    options = OmegaConf.to_container(node, resolve=True)
    interval = options.pop("interval", None)
    if interval not in (None, *INTERVALS):
        raise TrainlabError(f"scheduler.interval={interval!r}; choose one of {INTERVALS}")
    if interval is None:
        per_batch = str(options["_target_"]).rsplit(".", 1)[-1] in PER_BATCH
        interval = "step" if per_batch else "epoch"
    length = steps_per_epoch * max_epochs if interval == "step" else max_epochs
    for key in ("total_steps", "T_max"):
        if key in options and options[key] is None:
            options[key] = length
    _peaks_per_group(options, optimizer)
    scheduler = build(OmegaConf.create(options), "scheduler", choice)(optimizer)
    scheduled = ScheduledLR(scheduler, interval)
    if scheduled.needs_metric and interval == "step":
        raise TrainlabError(
            f"scheduler={choice or options['_target_']} reads trainer.monitor, which is only "
            "computed after each epoch's validation; set scheduler.interval=epoch"
        )
    return scheduled


def _peaks_per_group(options: dict, optimizer: torch.optim.Optimizer) -> None:
    """A single ``max_lr``/``base_lr`` becomes one per param group, scaled as each group's
    lr is to ``optimizer.lr``: the head keeps its ``head_lr`` ratio through the cycle."""
    base = optimizer.defaults.get("lr")
    if not base:
        return
    ratios = [group["lr"] / base for group in optimizer.param_groups]
    if all(ratio == 1 for ratio in ratios):
        return
    for key in ("max_lr", "base_lr"):
        if isinstance(options.get(key), (int, float)):
            options[key] = [options[key] * ratio for ratio in ratios]
            options["_convert_"] = "all"  # torch wants plain lists


# scheduler attributes that are lists but not one entry per param group
_NOT_PER_GROUP = {"_schedulers", "_milestones", "milestones", "_schedule_phases"}


# lrs a param group and a scheduler keep per group, which scale with the group's own lr (a
# floor such as ReduceLROnPlateau's min_lrs is the same for every group)
_GROUP_LRS = ("lr", "initial_lr", "max_lr", "min_lr")
_SCHEDULER_LRS = {"base_lrs", "_last_lr", "max_lrs"}

JOINED_MID_RUN = "joined_mid_run"  # marks a param group added after the optimizer was built


def add_param_group(
    optimizer: torch.optim.Optimizer, scheduler: object | None, group: dict, like: int = 0,
    lr_scale: float = 1.0,
) -> None:
    """Add ``group`` to the optimizer as a copy of group ``like``'s schedule: its current
    lr and the scheduler's per-group state (``initial_lr``, OneCycleLR's ``max_lr``, the
    ``base_lrs``, ``lr_lambdas``, … lists), so the new group follows the same curve, its
    lrs ``lr_scale`` times ``like``'s (a group configured with another lr)."""
    reference = optimizer.param_groups[like]
    n_groups = len(optimizer.param_groups)
    new = {key: copy.deepcopy(value) for key, value in reference.items() if key != "params"}
    new.update({key: new[key] * lr_scale for key in _GROUP_LRS if key in new})
    optimizer.add_param_group({**new, **group, JOINED_MID_RUN: True})
    pending = [scheduler] if scheduler is not None else []
    while pending:
        current = pending.pop()
        pending += getattr(current, "_schedulers", [])
        for name, value in vars(current).items():
            if name not in _NOT_PER_GROUP and isinstance(value, list) and len(value) == n_groups:
                entry = copy.copy(value[like])
                value.append(entry * lr_scale if name in _SCHEDULER_LRS else entry)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.1,
    start_factor: float = 0.01,
    eta_min: float = 0.0,
) -> lr_scheduler.SequentialLR:
    """Linear warmup from ``start_factor`` × lr over the first steps, then cosine to ``eta_min``."""
    if not 0 <= warmup_fraction < 1:
        raise TrainlabError(
            f"scheduler.warmup_fraction={warmup_fraction}; choose a value in [0, 1)"
        )
    warmup = max(1, round(total_steps * warmup_fraction))
    return lr_scheduler.SequentialLR(
        optimizer,
        [
            lr_scheduler.LinearLR(optimizer, start_factor, 1.0, total_iters=warmup),
            lr_scheduler.CosineAnnealingLR(optimizer, max(1, total_steps - warmup), eta_min),
        ],
        milestones=[warmup],
    )


def chain(
    optimizer: torch.optim.Optimizer,
    schedulers: Sequence[Callable[[torch.optim.Optimizer], lr_scheduler.LRScheduler]],
) -> lr_scheduler.ChainedScheduler:
    """Several schedulers stepped together; each multiplies in its own factor."""
    return lr_scheduler.ChainedScheduler([make(optimizer) for make in schedulers], optimizer)


def expression(source: str | float, variable: str) -> Callable[[int], float]:
    """``"0.1 ** (epoch // 30)"`` → a function of ``epoch``; only arithmetic and ``math``."""
    try:
        tree = ast.parse(str(source), mode="eval")
    except SyntaxError as err:
        raise TrainlabError(f"scheduler.lr_lambda={source!r} is not an expression: {err}") from None
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} - {"math", variable}
    names |= {f".{node.attr}" for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and node.attr.startswith("_")}
    if names:
        raise TrainlabError(
            f"scheduler.lr_lambda={source!r} uses {sorted(names)}; it may only use "
            f"'{variable}', numbers, operators and math.*"
        )
    code = compile(tree, "<scheduler lr_lambda>", "eval")

    def factor(value: int) -> float:
        return eval(code, {"__builtins__": {}, "math": math}, {variable: value})

    return factor


def lambda_lr(optimizer: torch.optim.Optimizer, lr_lambda: str) -> lr_scheduler.LambdaLR:
    """LambdaLR whose factor of the initial lr is a YAML expression of ``epoch``."""
    return lr_scheduler.LambdaLR(optimizer, expression(lr_lambda, "epoch"))


def multiplicative(
    optimizer: torch.optim.Optimizer, lr_lambda: str | float
) -> lr_scheduler.MultiplicativeLR:
    """MultiplicativeLR: each step multiplies the lr by a YAML expression of ``epoch``."""
    return lr_scheduler.MultiplicativeLR(optimizer, expression(lr_lambda, "epoch"))


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The param groups' lrs by metric name: ``lr`` for an optimizer built with one group,
    else ``lr/<group name>``. A group that joins mid-run (gradual unfreezing's ``unfrozen``)
    is ``lr/<its name>`` beside them, so the series logged so far go on under their names."""
    groups = optimizer.param_groups
    alone = sum(not group.get(JOINED_MID_RUN) for group in groups) == 1
    return {"lr" if alone and not group.get(JOINED_MID_RUN)
            else f"lr/{group.get('name', f'group{i}')}": group["lr"]
            for i, group in enumerate(groups)}


class LrLog:
    """The lrs of the optimizer's param groups over a run: noted at every change and logged
    to the tracker at the step each change took effect. Groups may join mid-run
    (unfreezing)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, {name: lr}) at changes
        self._unlogged: list[tuple[int, dict[str, float]]] = []

    @property
    def current(self) -> dict[str, float]:
        return self.history[-1][1]

    def changed_at(self, step: int) -> bool:
        return bool(self.history) and self.history[-1][0] == step

    def record(self, step: int) -> None:
        """Note the lrs at ``step`` when they differ from the last noted ones."""
        lrs = current_lrs(self.optimizer)
        if not self.history or self.history[-1][1] != lrs:
            self.history.append((step, lrs))
            self._unlogged.append((step, lrs))

    def resumed(self, step: int, logged: dict[str, float] | None = None) -> None:
        """A resumed run logged its lrs before ``step``: note them there, and log them as a
        change when they are not the ``logged`` ones (its last epoch logs none it would not
        train with; a run going on from there does)."""
        lrs = current_lrs(self.optimizer)
        self.history = [(step, lrs)]
        if logged is not None and logged != lrs:
            self._unlogged.append((step, lrs))

    def log_changes(self, tracker) -> None:
        """Log every change since the last call, each at the step it took effect."""
        tracker.log_metric_series(list(self._unlogged))
        self._unlogged.clear()

    def plot(self, path: str | Path, last_step: int, steps_per_epoch: int) -> Path:
        """The lr curve of the run up to ``last_step`` as a PNG."""
        steps = [step for step, _ in self.history] + [last_step]
        lrs = [lrs for _, lrs in self.history] + [self.history[-1][1]]
        return plot_lr(steps, lrs, path, steps_per_epoch=steps_per_epoch)


def simulate(
    scheduled: ScheduledLR | None,
    optimizer: torch.optim.Optimizer,
    batches_per_epoch: int,
    max_epochs: int,
    metric: float = 0.0,
    accumulate: int = 1,
    callbacks: Sequence[Any] = (),
) -> list[dict[str, float]]:
    """The lr of every param group at each training batch, stepping as the runner does
    (the optimizer and a per-step scheduler once every ``accumulate`` batches, then at each
    epoch's end a per-epoch scheduler and the ``callbacks``: gradual unfreezing adds its
    param group there).

    The optimizer steps without gradients (a no-op on the weights); ``plateau`` sees the
    same ``metric`` every epoch, i.e. a run that never improves.
    """
    from types import SimpleNamespace

    runner = SimpleNamespace(optimizer=optimizer, scheduler=scheduled, ema=None)
    lrs = []
    for epoch in range(max_epochs):
        for index in range(batches_per_epoch):
            lrs.append(current_lrs(optimizer))
            if (index + 1) % accumulate and index + 1 != batches_per_epoch:
                continue
            optimizer.step()
            if scheduled is not None and scheduled.interval == "step":
                scheduled.step()
        if scheduled is not None and scheduled.interval == "epoch":
            scheduled.step(metric)
        for callback in callbacks:
            callback.on_epoch_end(runner, epoch, {})
    return lrs


def plot_lr(
    steps: Sequence[int], lrs: Sequence[dict[str, float]], path: str | Path,
    title: str = "learning rate", steps_per_epoch: int | None = None,
) -> Path:
    """Write the lr of each param group over training steps as a PNG (a step plot); a group
    added mid-run (gradual unfreezing) starts where it appears."""
    from trainlab.plots import pyplot, save_figure

    plt = pyplot()

    names = list(dict.fromkeys(name for row in lrs for name in row))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name in names:
        ax.step(steps, [row.get(name, math.nan) for row in lrs], where="post", label=name)
    if steps_per_epoch:
        ax.secondary_xaxis(
            "top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch)
        ).set_xlabel("epoch")
    ax.set(xlabel="step", ylabel="lr")
    fig.suptitle(textwrap.fill(title, 80))  # a long title wraps instead of leaving the frame
    if len(names) > 1:
        ax.legend()
    return save_figure(fig, path)
