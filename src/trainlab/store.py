"""The MLflow store that reading commands (`trainlab runs`, `eval`/`predict run_id=`,
`reproduce`) open: one that does not exist is refused in one line, never created empty
in whatever folder the command happened to run in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainlab.errors import TrainlabError


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == prefix:
        return None
    return Path(uri[len(prefix):].split("?", 1)[0])


def existing_store(option: str, tracking_uri: str | None = None) -> Any:
    """A client of ``tracking_uri`` (else MLflow's current URI) once its store is known to
    exist; ``option`` is how the command is told another store, named in the refusal."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    path = sqlite_file(uri)
    if path is not None and not path.is_file():
        raise TrainlabError(f"no MLflow store at {uri}: nothing was tracked there; run this "
                            f"where you trained, or name the store with {option} or "
                            "MLFLOW_TRACKING_URI")
    return MlflowClient()
