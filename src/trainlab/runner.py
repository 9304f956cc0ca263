"""The training loop: epochs of train → validate → schedule → checkpoint → log."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from trainlab import distributed
from trainlab.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainlab.distributed import select_device
from trainlab.errors import TrainlabError
from trainlab.metrics import TaskMetrics, plot_confusion
from trainlab.precision import Precision
from trainlab.schedulers import ScheduledLR, current_lrs, plot_lr

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What a finished ``fit`` hands back: the monitored metric's best value and the history."""

    best: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


class Runner:
    """Trains ``model`` with ``loss`` and ``optimizer`` on the loaders, logging to ``tracker``.

    The step order is the one torch requires: forward → loss → backward (×
    ``accumulate_grad_batches``) → clip → optimizer.step → zero_grad → (per-batch)
    scheduler.step; per-epoch schedulers step after validation. Losses and accuracy
    accumulate on the device and are read once per logging interval. In a DDP group the
    model is wrapped for training, metrics are averaged over ranks, and rank 0 alone
    prints and writes checkpoints. SIGINT/SIGTERM end the run at the next step with a
    checkpoint that ``resume`` continues from exactly. ``devices`` is read by the launcher.
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
        devices: Any = "auto",
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        sync_batchnorm: bool = False,
        detect_anomaly: bool = False,
        early_stopping: dict | None = None,
        resume: str | Path | None = None,
    ) -> None:
        if monitor_mode not in ("min", "max"):
            raise TrainlabError(f"trainer.monitor_mode={monitor_mode!r}; choose 'min' or 'max'")
        if int(accumulate_grad_batches) < 1:
            raise TrainlabError(
                f"trainer.accumulate_grad_batches={accumulate_grad_batches}; must be >= 1"
            )
        self.device = device or select_device(accelerator)
        if sync_batchnorm and distributed.is_distributed():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        self.train_model = self.model  # what the training forward runs: DDP-wrapped in a group
        if distributed.is_distributed():
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        self.accumulate = int(accumulate_grad_batches)
        self.gradient_clip_val = gradient_clip_val
        self.detect_anomaly = bool(detect_anomaly)
        self.resume = Path(resume) if resume else None
        self._skip_batches = 0  # batches of the first epoch a mid-epoch checkpoint already did
        self._pending_rng: dict | None = None
        self._signal: int | None = None
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
        # (step, {metric name: lr}) at every change; groups may join mid-run (unfreezing)
        self.lr_history: list[tuple[int, dict[str, float]]] = []
        self._lr_pending: list[tuple[int, dict[str, float]]] = []  # changes not yet logged
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
        patience = (early_stopping or {}).get("patience")
        if patience is not None:
            self.callbacks.append(EarlyStopping(int(patience)))
        self.should_stop = False  # set by a callback (early stopping, pruning) to end fit

    # ------------------------------------------------------------------ public
    def fit(self) -> FitResult:
        """Train from scratch or from ``resume``; SIGINT/SIGTERM become a checkpoint plus
        KeyboardInterrupt, and ``detect_anomaly`` traces the op that made a NaN."""
        if self.resume is not None:
            self.load_state(self.resume)
        with self._signals_caught(), torch.autograd.set_detect_anomaly(self.detect_anomaly):
            try:
                result = self._fit_epochs()
            except RuntimeError as err:
                if self.detect_anomaly and "nan" in str(err).lower():
                    raise TrainlabError(
                        f"autograd anomaly at epoch {self.epoch + 1}, step "
                        f"{self.global_step + 1}: {err}"
                    ) from err
                raise
        if not distributed.ranks_in_sync(self.model):
            raise RuntimeError("DDP ranks ended with different parameters")
        return result

    def _fit_epochs(self) -> FitResult:
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
                metrics.update(self.lr_history[-1][1])
            self.tracker.log_metrics(metrics, step=self.global_step)
            self._log_lr_changes()
            history.append(metrics)
            self._print_epoch(epoch, metrics, time.perf_counter() - started, improved)
            for callback in self.callbacks:
                callback.on_epoch_end(self, epoch, metrics)
            self._record_lr()  # a callback may have added a param group (unfreezing)
            if distributed.any_rank(self._signal is not None):
                self._interrupted(self.checkpoint_dir / "last.pt")
            if self.should_stop:
                break
        self._log_plots()
        return FitResult(best=self.best, best_epoch=self.best_epoch, history=history)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        for source in (self.train_loader, getattr(self.train_loader, "sampler", None)):
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)
        totals = self.metrics.train(self.device)
        per_batch_scheduler = self.scheduler if (
            self.scheduler is not None and self.scheduler.interval == "step"
        ) else None
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch + 1}/{self.max_epochs}",
            leave=False,
            disable=not self.progress_bar or not distributed.is_main_process(),
            dynamic_ncols=True,
        )
        n_batches, skip, self._skip_batches = len(self.train_loader), self._skip_batches, 0
        self.optimizer.zero_grad(set_to_none=True)
        for index, (inputs, targets) in enumerate(bar):
            if index < skip:  # done before the checkpoint this run resumed from
                continue
            if self._pending_rng is not None:
                set_rng_state(self._pending_rng)
                self._pending_rng = None
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            boundary = (index + 1) % self.accumulate == 0 or index + 1 == n_batches
            with self._grad_sync(boundary):
                with self.precision.autocast():
                    logits = self.train_model(inputs)
                    loss = self.loss(logits, targets)
                self.precision.backward(loss / self.accumulate if self.accumulate > 1 else loss)
            if boundary:
                stepped = self._optimizer_step()
                if stepped and per_batch_scheduler is not None:
                    per_batch_scheduler.step()
            totals.update(loss, logits, targets)
            self.global_step += 1
            if per_batch_scheduler is not None:
                self._record_lr()
            at_log_step = self.global_step % self.log_every == 0
            if at_log_step:
                window_loss = distributed.reduce_mean({"loss": totals.window()})["loss"]
                self._check_finite(window_loss)
                self.tracker.log_metrics({"train/loss": window_loss}, step=self.global_step)
                self._log_lr_changes()
                bar.set_postfix(loss=f"{window_loss:.4f}", refresh=False)
            if boundary and index + 1 < n_batches and self._interrupt_requested(at_log_step):
                self._save(self.checkpoint_dir / "last.pt", {}, batches_done=index + 1)
                self._interrupted(self.checkpoint_dir / "last.pt")
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

    def load_state(self, path: str | Path) -> None:
        """Continue from a checkpoint: weights, optimizer, scheduler, loss scale, counters,
        random generators, and the position inside an epoch an interruption left."""
        state = load_checkpoint(path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.scheduler.load_state_dict(state["scheduler"])
            self.precision.load_state_dict(state.get("scaler") or {})
        except (KeyError, RuntimeError, ValueError) as err:
            raise TrainlabError(
                f"trainer.resume={path} does not fit this run's model/optimizer: {err}"
            ) from err
        self.global_step = int(state["global_step"])
        self.best, self.best_epoch = float(state["best"]), int(state.get("best_epoch", -1))
        batches_done = state.get("batches_done")
        self.epoch = int(state["epoch"]) + (1 if batches_done is None else 0)
        self._skip_batches = int(batches_done or 0)
        if "rng" in state:
            if self._skip_batches:  # restored where the interrupted run stood: after them
                self._pending_rng = state["rng"]
            else:
                set_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch + 1, self.global_step)

    # ----------------------------------------------------------------- helpers
    def _is_better(self, value: float) -> bool:
        return value < self.best if self.monitor_mode == "min" else value > self.best

    def _record_lr(self) -> None:
        """Note the lrs of the param groups when they differ from the last noted ones."""
        lrs = current_lrs(self.optimizer)
        if not self.lr_history or self.lr_history[-1][1] != lrs:
            self.lr_history.append((self.global_step, lrs))
            self._lr_pending.append((self.global_step, lrs))

    def _log_lr_changes(self) -> None:
        """Log every lr change since the last call, each at the step it took effect."""
        self.tracker.log_metric_series(list(self._lr_pending))
        self._lr_pending.clear()

    def _log_plots(self) -> None:
        """The lr curve over the run and (classification) the last confusion matrix, as PNGs."""
        folder = self.checkpoint_dir.parent / "plots"
        steps = [step for step, _ in self.lr_history] + [self.global_step]
        lrs = [lrs for _, lrs in self.lr_history] + [self.lr_history[-1][1]]
        self.tracker.log_artifact(
            plot_lr(steps, lrs, folder / "lr_curve.png",
                    steps_per_epoch=len(self.train_loader)), "plots")
        if self.confusion is not None:
            self.tracker.log_artifact(
                plot_confusion(self.confusion, folder / "confusion_matrix.png"), "plots")

    def _check_finite(self, value: float) -> None:
        if not math.isfinite(value):
            last = self.checkpoint_dir / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint yet"
            raise TrainlabError(
                f"loss became {value} at epoch {self.epoch + 1}, step {self.global_step}; {kept}"
            )

    def _grad_sync(self, boundary: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients only on the micro-batch that ends an accumulation."""
        if boundary or self.train_model is self.model:
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def _optimizer_step(self) -> bool:
        """Clip (unscaled), step, zero the gradients; False when the loss scaler skipped."""
        if self.gradient_clip_val:
            self.precision.unscale(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), float(self.gradient_clip_val))
        stepped = self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return stepped

    @contextlib.contextmanager
    def _signals_caught(self):
        """SIGINT/SIGTERM only set a flag; the loop checkpoints and stops at the next step.
        A second signal stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum, _frame):
            if self._signal is not None:
                raise KeyboardInterrupt
            self._signal = signum

        previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _interrupt_requested(self, at_log_step: bool) -> bool:
        """Every step in one process; in a DDP group all ranks agree at logging steps."""
        if self.train_model is self.model:
            return self._signal is not None
        return at_log_step and distributed.any_rank(self._signal is not None)

    def _interrupted(self, checkpoint: Path) -> None:
        if distributed.is_main_process():
            tqdm.write(
                f"interrupted at epoch {self.epoch + 1}, step {self.global_step}; checkpoint "
                f"{checkpoint}; continue with trainer.resume={checkpoint}"
            )
        raise KeyboardInterrupt

    def _save(self, path: Path, metrics: dict[str, float], batches_done: int | None = None):
        """Rank 0 writes everything a resumed run needs; ``batches_done`` marks a checkpoint
        taken inside an epoch."""
        if not distributed.is_main_process():
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.precision.state_dict(),
            "epoch": self.epoch,
            "batches_done": batches_done,
            "global_step": self.global_step,
            "metrics": metrics,
            "monitor": self.monitor,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "rng": rng_state(),
            "mlflow_run_id": getattr(self.tracker, "run_id", None),
        }
        save_checkpoint(state, path)

    def _save_checkpoints(self, metrics: dict[str, float], improved: bool) -> None:
        self._save(self.checkpoint_dir / "last.pt", metrics)
        if improved:
            self._save(self.checkpoint_dir / "best.pt", metrics)

    def _print_epoch(self, epoch: int, metrics: dict, seconds: float, improved: bool) -> None:
        if not distributed.is_main_process():
            return
        main = self.metrics.main
        line = (
            f"epoch {epoch + 1:>3}/{self.max_epochs}  "
            f"train loss {metrics['train/loss_epoch']:.4f} {main} {metrics[f'train/{main}']:6.2%}  "
            f"val loss {metrics['val/loss']:.4f} {main} {metrics[f'val/{main}']:6.2%}  "
            f"lr {self.optimizer.param_groups[0]['lr']:.2e}  {seconds:5.1f}s"
            + ("  *best" if improved else "")
        )
        tqdm.write(line)


class EarlyStopping:
    """Stops the fit when ``trainer.monitor`` has not improved for ``patience`` epochs."""

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise TrainlabError(f"trainer.early_stopping.patience={patience}; must be >= 1")
        self.patience = patience

    def on_epoch_end(self, runner: Runner, epoch: int, metrics: dict[str, float]) -> None:
        if epoch - runner.best_epoch >= self.patience:
            runner.should_stop = True
            if distributed.is_main_process():
                tqdm.write(
                    f"early stopping: {runner.monitor} has not improved for {self.patience} "
                    f"epochs (best {runner.best:.4f} at epoch {runner.best_epoch + 1})"
                )
