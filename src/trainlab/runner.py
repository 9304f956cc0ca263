"""The training loop: epochs of train → validate → schedule → checkpoint → log."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from trainlab import distributed
from trainlab.checkpoint import Checkpoints, KeptRows, load_checkpoint, rng_state, set_rng_state
from trainlab.errors import TrainlabError
from trainlab.metrics import TaskMetrics, confusion_report
from trainlab.models.batchnorm import EpochStatistics
from trainlab.precision import Precision
from trainlab.schedulers import LrLog, ScheduledLR
from trainlab.signals import StopRequest
from trainlab.tracker import PARENT_RUN_ENV

log = logging.getLogger(__name__)


# trainer keys the launcher and ``train.run`` read (the YAML callbacks they build, the
# metrics' top_k)
NOT_LOOP_KEYS = ("accelerator", "devices", "deterministic", "resume", "resume_as", "callbacks",
                 "top_k")


def loop_settings(trainer: DictConfig) -> DictConfig:
    """The ``trainer`` node without the keys the loop does not take."""
    return OmegaConf.masked_copy(trainer, [k for k in trainer if k not in NOT_LOOP_KEYS])


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
    prints and writes checkpoints. A stop signal (trainlab.signals) ends the run at the
    next step with a checkpoint that ``load_state`` continues from exactly;
    ``checkpoint_every_n_steps`` / ``checkpoint_every_n_minutes`` write such a mid-epoch
    ``last.pt`` on a schedule too, so a hard kill loses at most that much.
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
        monitor: str = "val/acc",
        monitor_mode: str = "max",
        progress_bar: bool = True,
        device: torch.device | None = None,
        callbacks: Sequence[Any] = (),
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        sync_batchnorm: bool = False,
        detect_anomaly: bool = False,
        early_stopping: dict | None = None,
        ema: float | None = None,
        checkpoint_every_n_steps: int | None = None,
        checkpoint_every_n_minutes: float | None = None,
        save_top_k: int | None = None,
    ) -> None:
        if int(accumulate_grad_batches) < 1:
            raise TrainlabError(
                f"trainer.accumulate_grad_batches={accumulate_grad_batches}; must be >= 1"
            )
        self.device = torch.device(device or "cpu")
        if sync_batchnorm and distributed.is_distributed():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        self.train_model = self.model  # what the training forward runs: DDP-wrapped in a group
        if distributed.is_distributed():
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        self.ema = _ema(self.model, ema)
        # what validation, checkpoints and the logged model use: the average when on
        self.eval_model = self.ema.module if self.ema is not None else self.model
        self.norm_stats = EpochStatistics(self.model)  # BatchNorm statistics of each epoch
        self.loss = loss.to(self.device) if isinstance(loss, nn.Module) else loss
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.metric_log = KeptRows(tracker)  # what the loop logs; checkpoints keep it too
        self.precision = precision or Precision()
        self.precision.setup(self.device)
        self.metrics = metrics or TaskMetrics("classification")
        self.metrics.check_monitor(monitor)
        self.monitor = monitor
        self.checkpoints = Checkpoints(checkpoint_dir, monitor, monitor_mode,
                                       checkpoint_every_n_steps, checkpoint_every_n_minutes,
                                       save_top_k)
        self.lr = LrLog(optimizer)
        self.stop = StopRequest()
        self.max_epochs = int(max_epochs)
        self.accumulate = int(accumulate_grad_batches)
        self.gradient_clip_val = gradient_clip_val
        self.detect_anomaly = bool(detect_anomaly)
        self.progress_bar = progress_bar
        self.log_every = max(1, int(getattr(tracker, "log_every_n_steps", 50)))
        self.callbacks = list(callbacks)
        patience = (early_stopping or {}).get("patience")
        if patience is not None:
            self.callbacks.append(EarlyStopping(int(patience)))
        self.global_step = 0
        self.epoch = 0
        self.should_stop = False  # set by a callback (early stopping, pruning) to end fit
        self.confusion: torch.Tensor | None = None  # of the last validation
        self.best_confusion: torch.Tensor | None = None  # of the best epoch's
        self._skip_batches = 0  # batches of the first epoch a mid-epoch checkpoint already did
        self._pending_totals: dict | None = None  # that epoch's partial train sums, to continue
        self._pending_rng: dict | None = None

    @property
    def tracker(self) -> Any:
        return self.metric_log.tracker

    @tracker.setter
    def tracker(self, tracker: Any) -> None:  # the run's tracker, set once it is open
        self.metric_log = KeptRows(tracker)

    @property
    def best(self) -> float:
        return self.checkpoints.best

    @property
    def best_epoch(self) -> int:
        return self.checkpoints.best_epoch

    # ------------------------------------------------------------------ public
    def fit(self) -> FitResult:
        """Train from scratch or from where ``load_state`` left it; a stop signal becomes a
        checkpoint plus KeyboardInterrupt, and ``detect_anomaly`` traces the op that made a
        NaN."""
        with self.stop, torch.autograd.set_detect_anomaly(self.detect_anomaly):
            try:
                result = self._fit_epochs()
                if distributed.any_rank(self.stop.requested):  # came after the last check
                    self._interrupted()
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
        self.lr.record(self.global_step)
        # resumed from the epoch an early stop ended (the run was stopped while it closed)
        stopped_early = self.epoch > 0 and not self._skip_batches and any(
            isinstance(callback, EarlyStopping)
            and callback.stops_after(self.epoch - 1, self.best_epoch)
            for callback in self.callbacks)
        for epoch in range(self.max_epochs if stopped_early else self.epoch, self.max_epochs):
            self.epoch = epoch
            started = time.perf_counter()
            metrics = {**self.train_epoch(epoch), **self.validate()}
            last_epoch = epoch + 1 == self.max_epochs  # the lrs it steps to train nothing
            if self.scheduler is not None and self.scheduler.interval == "epoch":
                self.scheduler.step(metrics[self.monitor])
                if not last_epoch:
                    self.lr.record(self.global_step)
            improved = self.checkpoints.note(metrics[self.monitor], epoch)
            if improved:
                self.best_confusion = self.confusion
            self.checkpoints.save(self._state(metrics), improved)
            metrics["epoch"] = epoch
            if not self.lr.changed_at(self.global_step) and not last_epoch:
                metrics.update(self.lr.current)  # (a change was logged as such just now)
            self.metric_log.log_metrics(metrics, step=self.global_step)
            self.lr.log_changes(self.metric_log)
            history.append(metrics)
            self._print_epoch(epoch, metrics, time.perf_counter() - started, improved)
            for callback in self.callbacks:
                callback.on_epoch_end(self, epoch, metrics)
            if not last_epoch:  # a callback may have added a group (unfreezing)
                self.lr.record(self.global_step)
            if distributed.any_rank(self.stop.requested):
                self._interrupted()
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
        if self._pending_totals is not None:
            totals.load_state_dict(self._pending_totals)
            self._pending_totals = None
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
        self.norm_stats.start_epoch()
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
            self.norm_stats.after_batch(index)
            if boundary:
                stepped = self._optimizer_step()
                if stepped and self.ema is not None:
                    self.ema.update_parameters(self.model)
                if stepped and per_batch_scheduler is not None:
                    per_batch_scheduler.step()
            totals.update(loss, logits, targets)
            self.global_step += 1
            if per_batch_scheduler is not None and not (
                    epoch + 1 == self.max_epochs and index + 1 == n_batches):
                self.lr.record(self.global_step)  # the lr of the next step, if there is one
            at_log_step = self.global_step % self.log_every == 0
            if at_log_step:  # the only place the step waits for the device
                window_loss = distributed.reduce_mean({"loss": totals.window()})["loss"]
                self._check_finite(window_loss)
                self.metric_log.log_metrics({"train/loss": window_loss}, step=self.global_step)
                self.lr.log_changes(self.metric_log)
                bar.set_postfix(loss=f"{window_loss:.4f}", refresh=False)
            if boundary and index + 1 < n_batches:
                stop = self._stop_now(at_log_step)
                if stop or self.checkpoints.periodic_due(self.global_step):
                    self.checkpoints.save(self._state({}, batches_done=index + 1, totals=totals))
                if stop:
                    self._interrupted()
        result = totals.compute()
        loss = result.pop("loss")
        self._check_finite(loss)
        return {"train/loss_epoch": loss, **{f"train/{k}": v for k, v in result.items()}}

    @torch.inference_mode()
    def validate(self) -> dict[str, float]:
        self.eval_model.eval()
        totals = self.metrics.val(self.device)
        for inputs, targets in self.val_loader:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with self.precision.autocast():
                logits = self.eval_model(inputs)
                loss = self.loss(logits, targets)
            totals.update(loss, logits, targets)
        self.confusion = totals.confusion()
        return {f"val/{name}": value for name, value in totals.compute().items()}

    def load_state(self, path: str | Path) -> dict:
        """Continue from a checkpoint: weights, optimizer, scheduler, loss scale, counters,
        random generators, and the position inside an epoch an interruption left."""
        state = load_checkpoint(path)
        self._check_same_batches(state, path)
        epochs_done = int(state["epoch"]) + (1 if state.get("batches_done") is None else 0)
        for callback in self.callbacks:  # the model and optimizer as the checkpoint left them
            if hasattr(callback, "on_resume"):
                callback.on_resume(self, epochs_done)
        try:
            self.model.load_state_dict(state.get("raw_model") or state["model"])
            if self.ema is not None and state.get("raw_model") is not None:
                self.ema.module.load_state_dict(state["model"])
                self.ema.n_averaged.fill_(int(state["ema_updates"]))
            _check_same_optimizer(self.optimizer, state["optimizer"], path)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.scheduler.load_state_dict(state["scheduler"])
            self.precision.load_state_dict(state.get("scaler") or {})
        except (KeyError, RuntimeError, ValueError) as err:
            raise TrainlabError(
                f"trainer.resume={path} does not fit this run's model/optimizer: {err}"
            ) from err
        self.global_step = int(state["global_step"])
        self.lr.resumed(self.global_step, state.get("lr_logged"))
        self.checkpoints.restore(state)
        batches_done = state.get("batches_done")
        self.epoch = int(state["epoch"]) + (1 if batches_done is None else 0)
        self._skip_batches = int(batches_done or 0)
        if self._skip_batches:
            self._pending_totals = state.get("train_totals")
        if "rng" in state:
            if self._skip_batches:  # restored where the interrupted run stood: after them
                self._pending_rng = state["rng"]
            else:
                set_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch + 1, self.global_step)
        return state

    # ----------------------------------------------------------------- helpers
    def _check_same_batches(self, state: dict, path: str | Path) -> None:
        """A checkpoint taken inside an epoch goes on after the batches it had done: with
        another batch size those would be other samples (some trained twice, some never)."""
        saved, now = state.get("batch_size"), getattr(self.train_loader, "batch_size", None)
        if state.get("batches_done") and None not in (saved, now) and saved != now:
            raise TrainlabError(
                f"trainer.resume={path} stopped inside epoch {int(state['epoch']) + 1} after "
                f"{state['batches_done']} batches of {saved}; data.batch_size={now} would "
                f"go on from other samples: resume with data.batch_size={saved}")

    def _state(self, metrics: dict[str, float], batches_done: int | None = None,
               totals: Any = None) -> dict:
        """Everything a resumed run needs; ``batches_done`` marks a checkpoint taken inside
        an epoch, with that epoch's partial train ``totals`` (one process only: in DDP each
        rank holds its own share, and the resumed epoch's train metrics restart)."""
        return {
            "model": self.eval_model.state_dict(),
            # with trainer.ema, "model" is the average and these the weights that train on
            "raw_model": self.model.state_dict() if self.ema is not None else None,
            "ema_updates": int(self.ema.n_averaged) if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.precision.state_dict(),
            "epoch": self.epoch,
            "batches_done": batches_done,
            "batch_size": getattr(self.train_loader, "batch_size", None),
            "global_step": self.global_step,
            "metrics": metrics,
            "rng": rng_state(),
            "mlflow_run_id": getattr(self.tracker, "run_id", None),
            "train_totals": totals.state_dict() if totals is not None
            and not distributed.is_distributed() else None,
            "logged_rows": self.metric_log.unconfirmed(),
            "lr_logged": self.lr.current if self.lr.history else None,
        }

    def _log_plots(self) -> None:
        """The lr curve over the run; the best epoch's confusion matrix and per-class table."""
        folder = self.checkpoints.folder.parent / "plots"
        self.tracker.log_artifact(
            self.lr.plot(folder / "lr_curve.png", self.global_step, len(self.train_loader)),
            "plots")
        if self.best_confusion is not None:  # the logged model's epoch
            figure, table = confusion_report(self.best_confusion, self.metrics, folder,
                                             self.best_epoch)
            self.tracker.log_artifact(figure, "plots")
            self.tracker.log_artifact(table, "metrics")

    def _check_finite(self, value: float) -> None:
        if not math.isfinite(value):
            last = self.checkpoints.last
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

    def _stop_now(self, at_log_step: bool) -> bool:
        """Every step in one process; in a DDP group all ranks agree at logging steps."""
        if self.train_model is self.model:
            return self.stop.requested
        return at_log_step and distributed.any_rank(self.stop.requested)

    def _interrupted(self) -> None:
        if distributed.is_main_process():
            last = self.checkpoints.last
            go_on = ("rerun the sweep's command: it runs the jobs not finished again"
                     if os.environ.get(PARENT_RUN_ENV) else f"continue with trainer.resume={last}")
            tqdm.write(f"interrupted at epoch {self.epoch + 1}, step {self.global_step}; "
                       f"checkpoint {last}; {go_on}")
        raise KeyboardInterrupt

    def _print_epoch(self, epoch: int, metrics: dict, seconds: float, improved: bool) -> None:
        if not distributed.is_main_process():
            return
        main = self.metrics.main
        line = (
            f"epoch {epoch + 1:>3}/{self.max_epochs}  "
            f"train loss {metrics['train/loss_epoch']:.4f} {main} {metrics[f'train/{main}']:6.2%}  "
            f"val loss {metrics['val/loss']:.4f} {main} {metrics[f'val/{main}']:6.2%}  "
            f"lr {next(iter(self.lr.current.values())):.2e}  {seconds:5.1f}s"
            + ("  *best" if improved else "")
        )
        tqdm.write(line)


def _ema(model: nn.Module, decay: float | None):
    """torch's exponential moving average of ``model``'s weights and buffers, updated after
    every optimizer step: average = decay · average + (1 − decay) · weights."""
    if decay is None:
        return None
    if not 0 < float(decay) < 1:
        raise TrainlabError(f"trainer.ema={decay}; choose a decay in (0, 1), e.g. 0.999, "
                            "or null for no average")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(decay)),
                         use_buffers=True)


class EarlyStopping:
    """Stops the fit when ``trainer.monitor`` has not improved for ``patience`` epochs."""

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise TrainlabError(f"trainer.early_stopping.patience={patience}; must be >= 1")
        self.patience = patience

    def stops_after(self, epoch: int, best_epoch: int) -> bool:
        return epoch - best_epoch >= self.patience

    def on_epoch_end(self, runner: Runner, epoch: int, metrics: dict[str, float]) -> None:
        if self.stops_after(epoch, runner.best_epoch):
            runner.should_stop = True
            if distributed.is_main_process():
                tqdm.write(
                    f"early stopping: {runner.monitor} has not improved for {self.patience} "
                    f"epochs (best {runner.best:.4f} at epoch {runner.best_epoch + 1})"
                )


# hyperparameters torch keeps in every optimizer's groups: the others tell optimizers apart
_SHARED_OPTIMIZER_KEYS = {"lr", "weight_decay", "maximize", "foreach", "capturable",
                          "differentiable", "fused", "decoupled_weight_decay"}


def _check_same_optimizer(optimizer: torch.optim.Optimizer, saved: dict, path) -> None:
    """torch loads another optimizer's state without a word and fails at the first step
    (SGD after Adam: KeyError 'momentum'), after the run was reopened: refuse it here."""
    needed = set(optimizer.defaults) - _SHARED_OPTIMIZER_KEYS
    held = set(saved["param_groups"][0]) if saved.get("param_groups") else needed
    if needed - held:
        kind = type(optimizer).__name__
        raise TrainlabError(
            f"trainer.resume={path} holds another optimizer's state (without the "
            f"{', '.join(sorted(needed - held))} that {kind} keeps): resume with the optimizer "
            f"it trained with, or start {kind} from its weights with model.weights_path={path}")
