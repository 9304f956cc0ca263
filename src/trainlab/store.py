"""The MLflow store that reading commands (`trainlab runs`, `eval`/`predict run_id=`,
`reproduce`, `trainer.resume=RUN_ID`) open: the one `trainlab train` here would log to; one
that does not exist is refused in one line, never created empty in whatever folder the
command happened to run in; and runs named by the short id prefix `trainlab runs` shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainlab.errors import TrainlabError

FULL_ID = 32  # characters of an MLflow run id
SWEEP_ROLE_TAG = "trainlab.role"  # "sweep" on a sweep's parent run
BEST_RUN_TAG = "trainlab.best_run"  # on a sweep's parent: its best job's run id
STUDY_TAG = "trainlab.study"  # on an Optuna sweep's parent: its study's name


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == prefix:
        return None
    return Path(uri[len(prefix):].split("?", 1)[0])


def configured(*keys: str) -> Any:
    """The first of ``keys`` set in the config `trainlab train` would run here (./conf,
    --config-dir, and conf/local/default.yaml, where a machine names its tracking server),
    or None."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from trainlab.app import compose

    if GlobalHydra.instance().is_initialized():
        return None  # inside a running app (a run, a sweep): its config chose the store
    cfg = compose("train")
    return next(filter(None, (OmegaConf.select(cfg, key, default=None) for key in keys)), None)


def existing_store(option: str, tracking_uri: str | None = None) -> Any:
    """A client of ``tracking_uri``, else of the store `trainlab train` here would log to:
    as there, the config's ``logger.tracking_uri`` (``paths.store``) before MLflow's current
    URI (``$MLFLOW_TRACKING_URI``, sqlite:///mlflow.db); once the store is known to exist.
    ``option`` is how the command is told another store, named in the refusal."""
    import mlflow
    from mlflow.tracking import MlflowClient

    tracking_uri = tracking_uri or configured("logger.tracking_uri", "paths.store")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    path = sqlite_file(uri)
    if path is not None and not path.is_file():
        raise TrainlabError(f"no MLflow store at {uri}: nothing was tracked there; run this "
                            f"where you trained, or name the store with {option} or "
                            "MLFLOW_TRACKING_URI")
    return MlflowClient()


def find_run(client: Any, prefix: str, experiment_ids: list[str] | None = None) -> Any:
    """The run whose id starts with ``prefix`` (a short id from `trainlab runs` is enough),
    in ``experiment_ids`` or, by default, in any experiment of the store."""
    from mlflow.exceptions import MlflowException

    prefix = str(prefix)
    if not prefix.strip():
        raise TrainlabError("no run id given; `trainlab runs` lists them (the first 8 "
                            "characters of an id are enough)")
    if len(prefix) == FULL_ID:  # no search through every run for a whole id
        try:
            run = client.get_run(prefix)
        except MlflowException:
            run = None
        if run is not None and run.info.experiment_id in (experiment_ids or [
                run.info.experiment_id]):
            return run
    where = "this experiment" if experiment_ids else f"the store {client.tracking_uri}"
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    found = [run for run in client.search_runs(experiment_ids, max_results=50000)
             if run.info.run_id.startswith(prefix)] if experiment_ids else []
    if len(found) != 1:
        which = "no run of {} has" if not found else f"{len(found)} runs of {{}} have"
        raise TrainlabError(f"{which.format(where)} an id starting with {prefix!r}"
                            + ("; give more characters" if found else ""))
    return found[0]


def best_job_hint(parent: Any) -> str:
    """Where to look instead of a sweep's parent run, which trained nothing itself."""
    short = parent.info.run_id[:8]
    best = parent.data.tags.get(BEST_RUN_TAG)
    name = parent.data.tags.get(f"{BEST_RUN_TAG}_name")
    return (f"run {short} is the parent of the sweep {parent.info.run_name!r} and trained "
            "nothing itself; " + (f"its best job is {best[:8]} ({name}); " if best else "")
            + f"`trainlab runs --sweep {short}` lists its jobs")
