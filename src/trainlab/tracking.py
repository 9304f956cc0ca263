"""MLflow: one run per training job, with its config, metrics, checkpoints and model."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainlab.errors import TrainlabError

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "TRAINLAB_PARENT_RUN_ID"  # set in a sweep's jobs: the sweep's parent run
PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer param values
METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# Keys that say how a run is executed or tracked, not what it trains: config.yaml keeps them.
NOT_COMPARED_GROUPS = {"hydra", "logger"}
NOT_COMPARED = ("logger.", "task_name", "trainer.progress_bar", "trainer.resume",
                "data.num_workers", "data.pin_memory", "data.persistent_workers")
_INTERPOLATION = re.compile(r"^\$\{[^}]*\}$")


def comparable_params(cfg, choices: Mapping[str, Any]) -> dict[str, Any]:
    """The params a run logs for comparing runs in the MLflow UI.

    Every config group's choice (``loss=focal``, ``optimizer=sgd``), so a sweep over groups
    reads as one column; then the values a user can set (``optimizer.lr``). Left out, and
    kept in ``config.yaml`` only: ``_target_``-style keys, unset (null) values, values that
    only copy another key (``model.num_classes: ${data.num_classes}``) and the keys in
    ``NOT_COMPARED``.
    """
    from omegaconf import OmegaConf

    params: dict[str, Any] = {
        group: choice for group, choice in choices.items()
        if choice is not None and "/" not in group and group not in NOT_COMPARED_GROUPS
    }
    raw = flatten(OmegaConf.to_container(cfg, resolve=False))
    for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items():
        if (value is None or key.startswith(NOT_COMPARED) or key in params
                or any(part.startswith("_") for part in key.split("."))
                or _INTERPOLATION.match(str(raw.get(key, "")))):
            continue
        params[key] = value
    return params


def git_commit(cwd: str | Path = ".") -> str | None:
    """The commit checked out at ``cwd``, or None outside a git work tree."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler or `kill` stopping the job) ends the run like Ctrl-C: KILLED."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class MlflowTracker:
    """Owns one MLflow run: opens it, logs to it in batches, and always closes it with a status."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "trainlab",
        log_every_n_steps: int = 10,
        log_model: bool = True,
        log_checkpoints: bool = True,
        flush_every_s: float = 5.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.log_every_n_steps = int(log_every_n_steps)
        self.log_model_enabled = log_model
        self.log_checkpoints = log_checkpoints
        self.flush_every_s = float(flush_every_s)
        self.run_id: str | None = None
        self._pending: list = []  # metrics not yet sent, flushed by time and at run end
        self._flushed_at = time.monotonic()

    # --------------------------------------------------------------- lifecycle
    def connect(self) -> str:
        """Point MLflow at the store and make sure it answers; returns the experiment id."""
        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        uri = mlflow.get_tracking_uri()
        if uri.startswith(("http://", "https://")):
            self._check_server(uri)
        return self._experiment_id()

    def _check_server(self, uri: str) -> None:
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
        except requests.RequestException as err:
            raise TrainlabError(
                f"MLflow tracking server {uri} is unreachable ({type(err).__name__}). Start it "
                "(`mlflow server`), or set logger.tracking_uri to a reachable server or to a "
                "sqlite:///FILE.db store."
            ) from err

    def _experiment_id(self) -> str:
        """Get or create the experiment; tolerates a parallel job creating it first."""
        client = MlflowClient()
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                return client.create_experiment(self.experiment_name)
            except MlflowException:
                experiment = client.get_experiment_by_name(self.experiment_name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    @contextlib.contextmanager
    def run(
        self, run_name: str, tags: Mapping[str, str], run_id: str | None = None
    ) -> Iterator[MlflowTracker]:
        """A run that ends FINISHED, FAILED (exception) or KILLED (Ctrl-C), whatever happens.

        With ``run_id`` (a resumed checkpoint's run) that run is reopened and continued.
        """
        experiment_id = self.connect()
        # A run left active by an earlier job in this process must not swallow this one.
        while mlflow.active_run() is not None:
            mlflow.end_run()
        tags = dict(tags)
        parent = os.environ.get(PARENT_RUN_ENV)  # set by sweeps.MlflowSweep
        if parent:
            tags["mlflow.parentRunId"] = parent
        status = "FAILED"
        try:  # from the first call on: a Ctrl-C at any point still closes the run KILLED
            if run_id is None:
                run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
            else:
                run = self._reopen(run_id)
                mlflow.set_tags(tags)
            self.run_id = run.info.run_id
            log.info("MLflow run %s (%s) in %s", run_name, self.run_id,
                     mlflow.get_tracking_uri())
            with _sigterm_as_interrupt():
                yield self
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except Exception as err:
            mlflow.set_tag("trainlab.error", f"{type(err).__name__}: {err}"[:5000])
            raise
        finally:
            try:
                self.flush()
                mlflow.flush_async_logging()
            finally:
                mlflow.end_run(status=status)

    def _reopen(self, run_id: str):
        try:
            return mlflow.start_run(run_id=run_id)
        except MlflowException as err:
            raise TrainlabError(
                f"the checkpoint's MLflow run {run_id} is not in {mlflow.get_tracking_uri()}; "
                "resume against the store the run was tracked in (logger.tracking_uri)"
            ) from err

    @contextlib.contextmanager
    def attach(self, run_id: str) -> Iterator[MlflowTracker]:
        """Log into a run another process owns (a DDP worker logging for the launching job);
        its final status stays the owner's to set."""
        self.connect()
        self.run_id = self._reopen(run_id).info.run_id
        try:
            yield self
        finally:
            try:
                self.flush()
            finally:
                mlflow.flush_async_logging()

    # ----------------------------------------------------------------- logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params in one batched call, long values truncated to MLflow's limit.

        On a resumed run, params logged before stay as they are (MLflow cannot change
        them); new values for them are reported, not logged.
        """
        clean = {key: str(value)[:PARAM_VALUE_LIMIT] for key, value in params.items()}
        logged = MlflowClient().get_run(self.run_id).data.params if self.run_id else {}
        changed = sorted(k for k in clean if k in logged and logged[k] != clean[k])
        if changed:
            log.warning("resumed run keeps its logged params; not re-logged: %s",
                        ", ".join(f"{k}={clean[k]}" for k in changed))
        mlflow.log_params({k: v for k, v in clean.items() if k not in logged})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step``; they reach MLflow every ``flush_every_s`` seconds."""
        self.log_metric_series([(step, metrics)])

    def log_metric_series(self, rows: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        """Queue the metrics of many steps (``(step, {name: value})`` rows).

        Every MLflow call costs milliseconds (and an asynchronous one holds the training
        thread's interpreter lock for as long), so the hot loop only appends to a list;
        ``flush`` sends it in one batched call every ``flush_every_s`` seconds.
        """
        stamp = int(time.time() * 1000)
        self._pending += [
            (key, float(value), stamp, step)
            for step, values in rows
            for key, value in values.items()
        ]
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Send the queued metrics now (also done when the run ends, whatever its status)."""
        self._flushed_at = time.monotonic()
        if self._pending and self.run_id is not None:
            pending, self._pending = self._pending, []
            metrics = [Metric(*row) for row in pending]
            client = MlflowClient()
            for start in range(0, len(metrics), METRICS_PER_BATCH):
                client.log_batch(self.run_id, metrics=metrics[start : start + METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow.set_tags({key: str(value) for key, value in tags.items()})

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        if Path(folder).is_dir():
            mlflow.log_artifacts(str(folder), artifact_path)

    def log_model(self, model: Any, input_example: Any) -> None:
        """Log the model so ``mlflow.pytorch.load_model("runs:/<id>/model")`` brings it back.

        Requirements are given explicitly: inferring them costs several seconds per run.
        """
        import torch

        if not self.log_model_enabled:
            return
        import mlflow.pytorch

        mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=input_example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )


class NullTracker:
    """The tracker of DDP ranks other than 0: takes every call and records nothing."""

    log_model_enabled = False
    log_checkpoints = False
    run_id = None

    def __init__(self, logger_cfg: Mapping[str, Any] | None = None) -> None:
        self.log_every_n_steps = int((logger_cfg or {}).get("log_every_n_steps", 10))

    def __getattr__(self, name: str):
        if name.startswith(("log_", "set_")):
            return lambda *args, **kwargs: None
        raise AttributeError(name)
