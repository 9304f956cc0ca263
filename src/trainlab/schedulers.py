"""Learning-rate schedulers from config, and whether each steps per epoch or per batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from trainlab.components import build

PER_BATCH = {"CyclicLR", "OneCycleLR"}


@dataclass
class ScheduledLR:
    """A torch scheduler plus when the runner steps it (``epoch`` or ``step``)."""

    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    interval: str

    @property
    def needs_metric(self) -> bool:
        return isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    def step(self, metric: float | None = None) -> None:
        if self.needs_metric:
            self.scheduler.step(metric)
        else:
            self.scheduler.step()


def build_scheduler(
    node: DictConfig, optimizer: torch.optim.Optimizer, choice: str | None = None
) -> ScheduledLR | None:
    """The scheduler of config ``node`` for ``optimizer``; ``None`` when ``_target_`` is null."""
    if node is None or node.get("_target_") is None:
        return None
    options = OmegaConf.to_container(node, resolve=True)
    interval = options.pop("interval", None)
    factory = build(OmegaConf.create(options), "scheduler", choice)
    scheduler = factory(optimizer)
    if interval is None:
        interval = "step" if type(scheduler).__name__ in PER_BATCH else "epoch"
    return ScheduledLR(scheduler, interval)
