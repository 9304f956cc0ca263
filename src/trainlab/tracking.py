"""MLflow: one run per training job, with its config, metrics, checkpoints and model."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainlab.errors import TrainlabError
from trainlab.liveness import HEARTBEAT_EVERY_S, process_tags
from trainlab.outbox import (
    Outbox,
    bounded_http_calls,
    did_not_answer,
    owe_model,
    short_http_calls,
)
from trainlab.signals import sigterm_as_interrupt
from trainlab.tracker import AT_SWEEP_END, NEVER, NOW, PARENT_RUN_ENV, log_model_choice

log = logging.getLogger(__name__)

MODEL_FORMATS = ("pickle", "pt2")
PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer param values
RESTORED_FROM_CHECKPOINT = ("optimizer.", "scheduler.")  # a resume loads their state whole
STOPPING_WAIT_S = 3.0  # Ctrl-C waits at most this long for a slow store; the spool keeps the rest


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
NOT_COMPARED_GROUPS = {"hydra", "logger", "paths", "debug"}
NOT_COMPARED = ("logger.", "paths.", "debug.", "task_name", "trainer.progress_bar",
                "trainer.resume", "trainer.callbacks", "data.check", "data.num_workers",
                "data.pin_memory", "data.persistent_workers")
_INTERPOLATION = re.compile(r"^\$\{[^}]*\}$")


def comparable_params(cfg, choices: Mapping[str, Any]) -> dict[str, Any]:
    """The params a run logs for comparing runs in the MLflow UI.

    Every config group's choice (``loss=focal``, ``optimizer=sgd``), so a sweep over groups
    reads as one column; then the values a user can set (``optimizer.lr``). Left out, and
    kept in ``config.yaml`` only: ``_target_``-style keys, nested object definitions (an
    augmentation pipeline's list of steps), unset (null) values, values that
    only copy another key (``model.num_classes: ${data.num_classes}``) and the keys in
    ``NOT_COMPARED``.
    """
    from omegaconf import OmegaConf

    params: dict[str, Any] = {
        group: choice for group, choice in choices.items()
        if choice is not None and not set("/@") & set(group) and group not in NOT_COMPARED_GROUPS
    }
    raw = flatten(OmegaConf.to_container(cfg, resolve=False))
    for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items():
        if (value is None or key.startswith(NOT_COMPARED) or key in params
                or any(part.startswith("_") for part in key.split("."))
                or (isinstance(value, list) and any(isinstance(v, dict) for v in value))
                or _INTERPOLATION.match(str(raw.get(key, "")))):
            continue
        params[key] = value
    return params


class OneLineStoreErrors(logging.Filter):
    """While a run is open, a store that does not answer is reported once, in one line, by
    the outbox. MLflow's sqlite layer also logs each such error with its traceback and SQL
    before raising it to that caller: those records are dropped. Its system-metrics thread
    says once that it stops: that record keeps only its first line."""

    LOGGERS = ("mlflow.store.db.utils", "mlflow.system_metrics.system_metrics_monitor")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == self.LOGGERS[0]:
            return record.levelno > logging.ERROR
        record.msg, record.args = record.getMessage().splitlines()[0], ()
        record.exc_info = record.exc_text = None
        return True


@contextlib.contextmanager
def one_line_store_errors() -> Iterator[None]:
    """Apply :class:`OneLineStoreErrors` for the duration of a run."""
    quiet = OneLineStoreErrors()
    loggers = [logging.getLogger(name) for name in OneLineStoreErrors.LOGGERS]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


@contextlib.contextmanager
def store_creation_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise the first use of a sqlite store: MLflow creates and migrates its schema on
    first contact, and two processes doing it at once break each other's migration."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    database = Path(tracking_uri[len("sqlite:///"):].split("?")[0])
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock", timeout=300):
        yield


class MlflowTracker:
    """Owns one MLflow run: opens it, logs to it in batches, and always closes it with a status.

    Implements :class:`trainlab.tracker.Tracker`."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "trainlab",
        log_every_n_steps: int = 10,
        log_model: str | bool = "best",
        log_checkpoints: bool = False,
        flush_every_s: float = 5.0,
        retry_every_s: float = 5.0,
        close_timeout_s: float = 10.0,
        model_format: str = "pickle",
        register_model: str | None = None,
        log_system_metrics: bool = True,
        system_metrics_every_s: float = 10.0,
    ) -> None:
        if model_format not in MODEL_FORMATS:
            raise TrainlabError(
                f"logger.model_format={model_format!r}; choose pickle (load_model gives back "
                "the trained module) or pt2 (a torch.export graph, for inference only)"
            )
        self.model_format = model_format
        self.register_model = register_model or None
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.log_every_n_steps = int(log_every_n_steps)
        self.log_model_mode = log_model_choice(log_model)  # all, best or none
        self.log_checkpoints = log_checkpoints
        self.flush_every_s = float(flush_every_s)
        self.retry_every_s = float(retry_every_s)
        self.close_timeout_s = float(close_timeout_s)
        self.log_system_metrics = bool(log_system_metrics)
        self.system_metrics_every_s = float(system_metrics_every_s)
        self.run_id: str | None = None
        self._outbox: Outbox | None = None  # sends the open run's calls off the training thread
        self._pending: list = []  # metrics not yet handed to the outbox, batched by time
        self._logged_upto: dict[str, int] = {}  # a reopened run's last logged step per metric
        self._logged_params: dict[str, str] = {}  # a reopened run's params (MLflow keeps them)
        self.metric_calls = 0
        self._flushed_at = time.monotonic()

    # --------------------------------------------------------------- lifecycle
    def connect(self) -> str:
        """Point MLflow at the store and make sure it answers; returns the experiment id."""
        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        uri = mlflow.get_tracking_uri()
        if uri.startswith(("http://", "https://")):
            bounded_http_calls()
            self._check_server(uri)
        with store_creation_lock(uri):
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
        self, run_name: str, tags: Mapping[str, str], run_id: str | None = None,
        spool_dir: Path | None = None,
    ) -> Iterator[MlflowTracker]:
        """A run that ends FINISHED, FAILED (exception) or KILLED (Ctrl-C), whatever happens.

        With ``run_id`` (a resumed checkpoint's run) that run is reopened and continued.
        Calls made inside go through an :class:`Outbox`; what the store cannot take before
        the run ends waits in ``spool_dir`` for `trainlab sync`.
        """
        with one_line_store_errors():
            yield from self._run(run_name, tags, run_id, spool_dir)

    def _run(self, run_name: str, tags: Mapping[str, str], run_id: str | None,
             spool_dir: Path | None) -> Iterator[MlflowTracker]:
        experiment_id = self.connect()
        # A run left active by an earlier job in this process must not swallow this one.
        while mlflow.active_run() is not None:
            mlflow.end_run()
        tags = {**tags, **process_tags()}  # where it runs: `trainlab runs --cleanup` asks
        parent = os.environ.get(PARENT_RUN_ENV)  # set by sweeps.MlflowSweep
        if parent:
            tags["mlflow.parentRunId"] = parent
        if self.log_system_metrics:
            mlflow.set_system_metrics_sampling_interval(self.system_metrics_every_s)
        if run_id is None:
            self._logged_upto, self._logged_params = {}, {}
            run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags,
                                   log_system_metrics=self.log_system_metrics)
        else:
            run = self._reopen(run_id, self.log_system_metrics)
        self.run_id = run.info.run_id
        status = "FAILED"
        try:  # from here on a Ctrl-C at any point still closes the run KILLED
            log.info("MLflow run %s (%s) in %s", run_name, self.run_id,
                     mlflow.get_tracking_uri())
            self._open_outbox(spool_dir, heartbeat_every_s=HEARTBEAT_EVERY_S)
            if run_id is not None:
                self.set_tags(tags)
            with sigterm_as_interrupt():
                yield self
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except Exception as err:
            if self._outbox is not None:
                self.set_tags({"trainlab.error": f"{type(err).__name__}: {err}"[:5000]})
            raise
        finally:
            unanswered = False
            if self._outbox is not None:
                unanswered = self._close_outbox({"call": "status", "status": status,
                                                 "end_time": int(time.time() * 1000)},
                                                stopping=status == "KILLED")
            # the outbox sent (or spooled) the status; this only lets go of MLflow's own run
            with contextlib.suppress(Exception), short_http_calls(unanswered):
                mlflow.end_run(status=status)

    def _open_outbox(self, spool_dir: Path | None,
                     heartbeat_every_s: float | None = None) -> None:
        self._outbox = Outbox(mlflow.get_tracking_uri(), self.run_id,
                              Path(spool_dir).resolve() if spool_dir else None,
                              retry_every_s=self.retry_every_s,
                              heartbeat_every_s=heartbeat_every_s)

    def _close_outbox(self, last_call: dict[str, Any] | None = None,
                      stopping: bool = False) -> bool:
        """Hand over the queued metrics (and ``last_call``), wait a bounded time for them
        to be sent, and say where the rest waits; True when the store did not take them.

        ``stopping`` (Ctrl-C, SIGTERM): no wait for a store that is down, and a short one
        for a store that is slow to answer; the spool keeps the rest."""
        self.flush()
        if last_call is not None:
            self._outbox.put(last_call)
        outbox, self._outbox = self._outbox, None
        timeout_s = min(self.close_timeout_s, STOPPING_WAIT_S) if stopping else self.close_timeout_s
        left = outbox.close(timeout_s, wait_offline=not stopping)
        if left and outbox.spool_dir is not None:
            print(f"MLflow did not take {left} calls of run {self.run_id}; they wait in "
                  f"{outbox.spool_dir}: send them with `trainlab sync "
                  f"{outbox.spool_dir.parent}`", file=sys.stderr, flush=True)
        elif left:
            log.warning("MLflow did not take %d calls of run %s; they are lost", left,
                        self.run_id)
        return bool(left)

    def _reopen(self, run_id: str, log_system_metrics: bool = False):
        """Reopen ``run_id``, noting each metric's last logged step: a resumed fit re-trains
        the steps after its checkpoint, and what the run already has is not sent again."""
        try:
            run = mlflow.start_run(run_id=run_id, log_system_metrics=log_system_metrics)
            self._logged_params = dict(run.data.params)
            self._logged_upto = {
                key: max((m.step for m in MlflowClient().get_metric_history(run_id, key)),
                         default=-1)
                for key in run.data.metrics
            }
            return run
        except MlflowException as err:
            raise TrainlabError(
                f"the checkpoint's MLflow run {run_id} is not in {mlflow.get_tracking_uri()}; "
                "resume against the store the run was tracked in (logger.tracking_uri)"
            ) from err

    @contextlib.contextmanager
    def attach(self, run_id: str, spool_dir: Path | None = None) -> Iterator[MlflowTracker]:
        """Log into a run another process owns (a DDP worker logging for the launching job);
        its final status stays the owner's to set."""
        self.connect()
        self.run_id = self._reopen(run_id).info.run_id
        self._open_outbox(spool_dir)
        try:
            with one_line_store_errors():
                yield self
        finally:
            self._close_outbox()

    # ----------------------------------------------------------------- logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params in one batched call, long values truncated to MLflow's limit.

        On a resumed run, params logged before stay as they are (MLflow cannot change
        them); new values for them are reported, not logged. Nothing here waits on the
        store: the reopened run's params were read when it was reopened.
        """
        clean = {key: str(value)[:PARAM_VALUE_LIMIT] for key, value in params.items()}
        logged = self._logged_params
        changed = sorted(k for k in clean if k in logged and logged[k] != clean[k])
        if changed:
            log.warning("resumed run keeps its logged params; not re-logged: %s",
                        ", ".join(f"{k}={clean[k]}" for k in changed))
        restored = [k for k in changed if k.startswith(RESTORED_FROM_CHECKPOINT)]
        if restored:
            log.warning("not applied either: %s; the optimizer and scheduler go on from the "
                        "checkpoint's state (to train the weights with new ones, start a new "
                        "run with model.weights_path=CHECKPOINT)", ", ".join(restored))
        self._outbox.put({"call": "params",
                          "params": {k: v for k, v in clean.items() if k not in logged}})

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
        self.metric_calls += 1
        self._pending += [
            (key, float(value), stamp, step)
            for step, values in rows
            for key, value in values.items()
            if step > self._logged_upto.get(key, -1)  # a resumed run re-trains those steps
        ]
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Hand the queued metrics to the outbox as one batch (also done at the run's end)."""
        self._flushed_at = time.monotonic()
        if self._pending and self._outbox is not None:
            pending, self._pending = self._pending, []
            self._outbox.put({"call": "metrics", "rows": pending, "through": self.metric_calls})

    def metric_calls_stored(self) -> int:
        return self._outbox.metric_calls_stored if self._outbox else self.metric_calls

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._outbox.put({"call": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._outbox.put({"call": "text", "text": text, "file": artifact_file})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._outbox.put({"call": "artifact", "path": str(Path(path).resolve()),
                          "artifact_path": artifact_path})

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        if Path(folder).is_dir():
            self._outbox.put({"call": "artifacts", "path": str(Path(folder).resolve()),
                              "artifact_path": artifact_path})

    def log_datasets(self, splits: Any, data_cfg: Mapping[str, Any], name: str) -> None:
        """The data splits as the run's MLflow dataset inputs (the UI's Dataset column)."""
        from trainlab.provenance import dataset_inputs

        self._outbox.put({"call": "inputs", "inputs": dataset_inputs(splits, data_cfg, name)})

    def model_logging(self, pruned: bool = False) -> str:
        """When this run logs its model. ``logger.log_model=best`` in a sweep's job: at the
        sweep's end, and only if the job is the sweep's best (``trainlab.late_model``)."""
        if self.log_model_mode == "none" or pruned:
            return NEVER
        if self.log_model_mode == "best" and os.environ.get(PARENT_RUN_ENV):
            return AT_SWEEP_END
        return NOW

    def log_model(self, model: Any, input_example: Any) -> bool:
        """Log the model so ``mlflow.pytorch.load_model("runs:/<id>/model")`` brings it back,
        registered as ``register_model`` when that is set; into the active run. Returns
        False when the store does not answer: the spool then records the model as owed,
        and `trainlab sync` logs it from the run's ``checkpoints/best.pt``.

        ``pickle`` (the default) gives back the module itself (``.eval()``, ``.train()``,
        fine-tunable) and saves fast; the code its classes need travels with it
        (:func:`model_code_paths`).
        ``pt2`` is torch.export's graph, for inference only.
        Requirements are given explicitly: inferring them costs several seconds per run.
        """
        if self._outbox is not None and self._outbox.offline:
            return self._owe_model(input_example)
        import mlflow.pytorch

        try:
            mlflow.pytorch.log_model(
                model,
                name="model",
                input_example=input_example,
                serialization_format=self.model_format,
                pip_requirements=model_requirements(model),
                code_paths=model_code_paths(model) if self.model_format == "pickle" else None,
                registered_model_name=self.register_model,
            )
        except Exception as err:
            if self._outbox is None or not did_not_answer(err):
                raise
            print(f"warning: MLflow at {self._outbox.tracking_uri} stopped answering while "
                  f"the model was logged ({str(err).splitlines()[0]})", file=sys.stderr,
                  flush=True)
            return self._owe_model(input_example)
        return True

    def _owe_model(self, input_example: Any) -> bool:
        """The store does not answer: the spool records the model as owed (False)."""
        spool_dir = self._outbox.spool_dir
        if spool_dir is None:
            print("warning: the model is not logged: MLflow does not answer; its weights "
                  "are in the run's checkpoints/best.pt", file=sys.stderr, flush=True)
            return False
        owe_model(spool_dir, self._outbox.tracking_uri, self.run_id, input_example,
                  {"model_format": self.model_format, "register_model": self.register_model})
        print("warning: the run's model waits for MLflow: it is logged if the server "
              "answers before the run closes, else by `trainlab sync "
              f"{spool_dir.parent}` from the run's checkpoints/best.pt",
              file=sys.stderr, flush=True)
        return False


def model_code_paths(model: Any) -> list[str]:
    """The code a pickled ``model`` needs that no pip requirement brings: trainlab's package
    and the top-level package (or module file) of each of the model's classes defined
    outside the installed libraries (a project's ``myproject.models``). MLflow puts them on
    ``sys.path`` when it loads the model, so it loads where neither is installed."""
    import importlib.util
    import sysconfig

    import trainlab

    installed = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib",
                                                                      "stdlib")}
    paths = {Path(trainlab.__file__).parent}
    for top in {type(module).__module__.split(".")[0] for module in model.modules()}:
        spec = importlib.util.find_spec(top) if top != "__main__" else None
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            continue
        origin = Path(spec.origin).resolve()
        code = origin.parent if spec.submodule_search_locations else origin
        if not any(folder in code.parents for folder in installed):
            paths.add(code)
    return sorted(str(path) for path in paths)


def model_requirements(model: Any) -> list[str]:
    """torch, and the model libraries whose classes the model is made of (timm, torchvision)."""
    from importlib.metadata import version

    libraries = {"torch"} | {
        type(module).__module__.split(".")[0] for module in model.modules()
    } & {"timm", "torchvision"}
    return [f"{name}=={version(name).split('+')[0]}" for name in sorted(libraries)]


CHAMPION = "champion"


def promote_champion(client: MlflowClient, name: str, runs: Sequence, metric: str,
                     mode: str) -> str | None:
    """Give alias ``champion`` to the version of registered model ``name`` whose run (among
    ``runs``, a sweep's jobs) reached the best ``metric``; returns that version."""
    import math

    versions = {v.run_id: v.version for v in client.search_model_versions(f"name='{name}'")}
    scored = []
    for run in runs:
        if run.info.run_id in versions and run.info.status == "FINISHED":
            history = client.get_metric_history(run.info.run_id, metric)
            values = [m.value for m in history if math.isfinite(m.value)]
            if values:
                best = min(values) if mode == "min" else max(values)
                scored.append((best if mode == "min" else -best, run.info.run_id))
    if not scored:
        log.warning("no finished job of this sweep registered a version of %s", name)
        return None
    version = versions[min(scored)[1]]
    client.set_registered_model_alias(name, CHAMPION, version)
    log.info("registered model %s: version %s is the %s", name, version, CHAMPION)
    return version
