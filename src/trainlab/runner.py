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
from trainlab.metrics import TaskMetrics, plot_confusion
from trainlab.precision import Precision
from trainlab.schedulers import ScheduledLR, lr_names, plot_lr

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
        metrics: TaskMetrics | None = None,
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
        self.metrics = metrics or TaskMetrics("classification")
        self.metrics.check_monitor(monitor)
        self.lr_history: list[tuple[int, list[float]]] = []  # (step, lrs) at every change
        self._lr_pending: list[tuple[int, list[float]]] = []  # changes not yet logged
        self.confusion: torch.Tensor | None = None
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
        self._record_lr()
        for epoch in range(self.epoch, self.max_epochs):
            self.epoch = epoch
            started = time.perf_counter()
            train_metrics = self.train_epoch(epoch)
            val_metrics = self.validate()
            metrics = {**train_metrics, **val_metrics}
            if self.scheduler is not None and self.scheduler.interval == "epoch":
                self.scheduler.step(metrics[self.monitor])
                self._record_lr()
            improved = self._is_better(metrics[self.monitor])
            if improved:
                self.best, self.best_epoch = metrics[self.monitor], epoch
            self._save_checkpoints(metrics, improved)
            metrics["epoch"] = epoch
            if self.lr_history[-1][0] != self.global_step:  # else logged as a change just now
                metrics.update(zip(lr_names(self.optimizer), self.lr_history[-1][1], strict=True))
            self.tracker.log_metrics(metrics, step=self.global_step)
            self._log_lr_changes()
            history.append(metrics)
            self._print_epoch(epoch, metrics, time.perf_counter() - started, improved)
            for callback in self.callbacks:
                callback.on_epoch_end(self, epoch, metrics)
            if self.should_stop:
                break
        self._log_plots()
        return FitResult(best=self.best, best_epoch=self.best_epoch, history=history)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        totals = self.metrics.train(self.device)
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
            if per_batch_scheduler is not None:
                self._record_lr()
            if self.global_step % self.log_every == 0:
                window_loss = totals.window()
                self._check_finite(window_loss)
                self.tracker.log_metrics({"train/loss": window_loss}, step=self.global_step)
                self._log_lr_changes()
                bar.set_postfix(loss=f"{window_loss:.4f}", refresh=False)
        result = totals.compute()
        loss = result.pop("loss")
        self._check_finite(loss)
        return {"train/loss_epoch": loss, **{f"train/{k}": v for k, v in result.items()}}

    @torch.inference_mode()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        totals = self.metrics.val(self.device)
        for inputs, targets in self.val_loader:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with self.precision.autocast():
                logits = self.model(inputs)
                loss = self.loss(logits, targets)
            totals.update(loss, logits, targets)
        self.confusion = totals.confusion()
        return {f"val/{name}": value for name, value in totals.compute().items()}

    # ----------------------------------------------------------------- helpers
    def _is_better(self, value: float) -> bool:
        return value < self.best if self.monitor_mode == "min" else value > self.best

    def _record_lr(self) -> None:
        """Note the lrs of the param groups when they differ from the last noted ones."""
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        if not self.lr_history or self.lr_history[-1][1] != lrs:
            self.lr_history.append((self.global_step, lrs))
            self._lr_pending.append((self.global_step, lrs))

    def _log_lr_changes(self) -> None:
        """Log every lr change since the last call, each at the step it took effect."""
        names = lr_names(self.optimizer)
        self.tracker.log_metric_series(
            [(step, dict(zip(names, lrs, strict=True))) for step, lrs in self._lr_pending]
        )
        self._lr_pending.clear()

    def _log_plots(self) -> None:
        """The lr curve over the run and (classification) the last confusion matrix, as PNGs."""
        folder = self.checkpoint_dir.parent / "plots"
        steps = [step for step, _ in self.lr_history] + [self.global_step]
        lrs = [lrs for _, lrs in self.lr_history] + [self.lr_history[-1][1]]
        self.tracker.log_artifact(
            plot_lr(steps, lrs, lr_names(self.optimizer), folder / "lr_curve.png",
                    steps_per_epoch=len(self.train_loader)), "plots")
        if self.confusion is not None:
            self.tracker.log_artifact(
                plot_confusion(self.confusion, folder / "confusion_matrix.png"), "plots")

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
        main = self.metrics.main
        line = (
            f"epoch {epoch + 1:>3}/{self.max_epochs}  "
            f"train loss {metrics['train/loss_epoch']:.4f} {main} {metrics[f'train/{main}']:6.2%}  "
            f"val loss {metrics['val/loss']:.4f} {main} {metrics[f'val/{main}']:6.2%}  "
            f"lr {self.optimizer.param_groups[0]['lr']:.2e}  {seconds:5.1f}s"
            + ("  *best" if improved else "")
        )
        tqdm.write(line)
