"""The training loop: epochs of train → validate → schedule → checkpoint → log."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from trainlab.checkpoint import save_checkpoint
from trainlab.distributed import select_device
from trainlab.errors import TrainlabError
from trainlab.metrics import ClassificationTotals
from trainlab.precision import Precision
from trainlab.schedulers import ScheduledLR

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What a finished ``fit`` hands back: the monitored metric's best value and the history."""

    best: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


class Runner:
    """Trains ``model`` with ``loss`` and ``optimizer`` on the loaders, logging to ``tracker``.

    The step order is the one torch requires: zero_grad → forward → loss → backward →
    optimizer.step → (per-batch) scheduler.step; per-epoch schedulers step after validation.
    Losses and accuracy accumulate on the device and are read once per logging interval.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: Any,
        val_loader: Any,
        tracker: Any,
        checkpoint_dir: str | Path,
        precision: Precision | None = None,
        scheduler: ScheduledLR | None = None,
        max_epochs: int = 10,
        accelerator: str = "cpu",
        monitor: str = "val/acc",
        monitor_mode: str = "max",
        deterministic: bool = False,
        progress_bar: bool = True,
        device: torch.device | None = None,
        callbacks: Sequence[Any] = (),
    ) -> None:
        if monitor_mode not in ("min", "max"):
            raise TrainlabError(f"trainer.monitor_mode={monitor_mode!r}; choose 'min' or 'max'")
        self.device = device or select_device(accelerator)
        self.model = model.to(self.device)
        self.loss = loss.to(self.device) if isinstance(loss, nn.Module) else loss
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.tracker = tracker
        self.checkpoint_dir = Path(checkpoint_dir)
        self.precision = precision or Precision()
        self.precision.setup(self.device)
        self.scheduler = scheduler
        self.max_epochs = int(max_epochs)
        self.monitor = monitor
        self.monitor_mode = monitor_mode
        self.progress_bar = progress_bar
        self.log_every = max(1, int(getattr(tracker, "log_every_n_steps", 50)))
        self.global_step = 0
        self.epoch = 0
        self.best = math.inf if monitor_mode == "min" else -math.inf
        self.best_epoch = -1
        self.callbacks = list(callbacks)
        self.should_stop = False  # set by a callback (early stopping, pruning) to end fit

    # ------------------------------------------------------------------ public
    def fit(self) -> FitResult:
        history = []
        for epoch in range(self.epoch, self.max_epochs):
            self.epoch = epoch
            started = time.perf_counter()
            train_metrics = self.train_epoch(epoch)
            val_metrics = self.validate()
            metrics = {**train_metrics, **val_metrics}
            if self.monitor not in metrics:
                raise TrainlabError(
                    f"trainer.monitor={self.monitor!r} is never computed; "
                    f"choose one of {sorted(metrics)}"
                )
            if self.scheduler is not None and self.scheduler.interval == "epoch":
                self.scheduler.step(metrics[self.monitor])
            improved = self._is_better(metrics[self.monitor])
            if improved:
                self.best, self.best_epoch = metrics[self.monitor], epoch
            self._save_checkpoints(metrics, improved)
            metrics["epoch"] = epoch
            metrics.update(self._lr_metrics())
            self.tracker.log_metrics(metrics, step=self.global_step)
            history.append(metrics)
            self._print_epoch(epoch, metrics, time.perf_counter() - started, improved)
            for callback in self.callbacks:
                callback.on_epoch_end(self, epoch, metrics)
            if self.should_stop:
                break
        return FitResult(best=self.best, best_epoch=self.best_epoch, history=history)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        totals = ClassificationTotals(self.device)
        per_batch_scheduler = self.scheduler if (
            self.scheduler is not None and self.scheduler.interval == "step"
        ) else None
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch + 1}/{self.max_epochs}",
            leave=False,
            disable=not self.progress_bar,
            dynamic_ncols=True,
        )
        for inputs, targets in bar:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            with self.precision.autocast():
                logits = self.model(inputs)
                loss = self.loss(logits, targets)
            self.precision.backward(loss)
            stepped = self.precision.step(self.optimizer)
            if stepped and per_batch_scheduler is not None:
                per_batch_scheduler.step()
            totals.update(loss, logits, targets)
            self.global_step += 1
            if self.global_step % self.log_every == 0:
                window_loss = totals.window()
                self._check_finite(window_loss)
                self.tracker.log_metrics(
                    {"train/loss": window_loss, **self._lr_metrics()}, step=self.global_step
                )
                bar.set_postfix(loss=f"{window_loss:.4f}", refresh=False)
        result = totals.compute()
        self._check_finite(result["loss"])
        return {"train/loss_epoch": result["loss"], "train/acc": result["acc"]}

    @torch.inference_mode()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        totals = ClassificationTotals(self.device)
        for inputs, targets in self.val_loader:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with self.precision.autocast():
                logits = self.model(inputs)
                loss = self.loss(logits, targets)
            totals.update(loss, logits, targets)
        result = totals.compute()
        return {"val/loss": result["loss"], "val/acc": result["acc"]}

    # ----------------------------------------------------------------- helpers
    def _is_better(self, value: float) -> bool:
        return value < self.best if self.monitor_mode == "min" else value > self.best

    def _lr_metrics(self) -> dict[str, float]:
        groups = self.optimizer.param_groups
        if len(groups) == 1:
            return {"lr": groups[0]["lr"]}
        return {f"lr/group{i}": group["lr"] for i, group in enumerate(groups)}

    def _check_finite(self, value: float) -> None:
        if not math.isfinite(value):
            raise TrainlabError(
                f"loss became {value} at epoch {self.epoch + 1}, step {self.global_step}; "
                f"the last good checkpoint is in {self.checkpoint_dir}"
            )

    def _save_checkpoints(self, metrics: dict[str, float], improved: bool) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.scheduler.state_dict() if self.scheduler else None,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "metrics": metrics,
            "monitor": self.monitor,
            "best": self.best,
        }
        save_checkpoint(state, self.checkpoint_dir / "last.pt")
        if improved:
            save_checkpoint(state, self.checkpoint_dir / "best.pt")

    def _print_epoch(self, epoch: int, metrics: dict, seconds: float, improved: bool) -> None:
        line = (
            f"epoch {epoch + 1:>3}/{self.max_epochs}  "
            f"train loss {metrics['train/loss_epoch']:.4f} acc {metrics['train/acc']:6.2%}  "
            f"val loss {metrics['val/loss']:.4f} acc {metrics['val/acc']:6.2%}  "
            f"lr {self.optimizer.param_groups[0]['lr']:.2e}  {seconds:5.1f}s"
            + ("  *best" if improved else "")
        )
        tqdm.write(line)
