"""What the training code asks of experiment tracking, and the tracker that records nothing.

``Tracker`` is the contract between the run (train.py, the runner, the DDP launcher) and a
tracking backend: :class:`trainlab.tracking.MlflowTracker` implements it for MLflow,
:class:`NullTracker` for ``logger=none`` and for DDP ranks other than 0. This module imports
neither torch nor mlflow, so a run without tracking never loads MLflow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from trainlab.errors import TrainlabError

PARENT_RUN_ENV = "TRAINLAB_PARENT_RUN_ID"  # set in a sweep's jobs: the sweep's parent run

# logger.log_model: which runs log their model. ``best`` (the default): a run its own, a
# sweep only its best job's, when the sweep ends. true and false, its earlier boolean form,
# mean all and none.
LOG_MODEL = ("all", "best", "none")
# When a run's model is logged (``Tracker.model_logging``):
NOW, AT_SWEEP_END, NEVER = "now", "at_sweep_end", "never"


def log_model_choice(value: Any) -> str:
    """``logger.log_model`` as one of ``LOG_MODEL``; true/false read as all/none."""
    if isinstance(value, bool):
        return "all" if value else "none"
    if value not in LOG_MODEL:
        raise TrainlabError(f"logger.log_model={value}: must be one of {', '.join(LOG_MODEL)}"
                            " (true and false mean all and none)")
    return value


@runtime_checkable
class Tracker(Protocol):
    """One tracked run. Logging calls are cheap: metrics are queued, never sent inline."""

    run_id: str | None  # the open run, written into checkpoints so a resume reopens it
    log_every_n_steps: int  # the loop reads its running loss this often
    log_checkpoints: bool  # whether the checkpoint folder is logged at the end
    metric_calls: int  # ``log_metric_series`` calls made in this process so far

    def connect(self) -> str | None:
        """Reach the store before anything runs; returns the experiment id (None: no store)."""

    def run(self, run_name: str, tags: Mapping[str, str], run_id: str | None = None,
            spool_dir: Path | None = None) -> contextlib.AbstractContextManager:
        """Open (or, with ``run_id``, reopen) the run; it always ends with a status:
        FINISHED, FAILED on an exception, KILLED on KeyboardInterrupt. What the store does
        not take in time waits in ``spool_dir``."""

    def attach(self, run_id: str,
               spool_dir: Path | None = None) -> contextlib.AbstractContextManager:
        """Log into a run another process owns (a DDP worker); its status stays the owner's."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_metric_series(self, rows: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        """Queue ``(step, {name: value})`` rows."""

    def flush(self) -> None:
        """Send what is queued now."""

    def metric_calls_stored(self) -> int:
        """How many of the first ``metric_calls`` the store has taken: those after it could
        still be lost by a hard kill (they are queued in memory)."""

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None: ...

    def log_datasets(self, splits: Any, data_cfg: Mapping[str, Any], name: str) -> None:
        """Record the data splits the run reads (MLflow's dataset inputs)."""

    def model_logging(self, pruned: bool = False) -> str:
        """When this run logs its model: ``NOW``, ``AT_SWEEP_END`` (only if it is its
        sweep's best job) or ``NEVER``; a ``pruned`` trial never does."""

    def log_model(self, model: Any, input_example: Any) -> bool:
        """Log the trained model so it can be loaded back from the run; False: not logged
        now (owed to the run, logged later from its best checkpoint)."""


class NullTracker:
    """Takes every call and records nothing: ``logger=none``, and DDP ranks other than 0."""

    run_id = None
    log_checkpoints = False
    metric_calls = 0  # nothing is queued, so nothing can be lost

    def __init__(self, log_every_n_steps: int = 10, **backend_settings: Any) -> None:
        """``backend_settings``: what presets set for a tracking store (``debug=fast``'s
        ``logger.experiment_name``, ``logger.log_model``): nothing to record them in."""
        self.log_every_n_steps = int(log_every_n_steps)

    @classmethod
    def like(cls, logger_cfg: Mapping[str, Any] | None) -> NullTracker:
        """A silent tracker that reads the loss as often as ``logger_cfg``'s tracker would."""
        return cls(int((logger_cfg or {}).get("log_every_n_steps", 10)))

    def connect(self) -> None:
        return None

    @contextlib.contextmanager
    def run(self, run_name: str, tags: Mapping[str, str], run_id: str | None = None,
            spool_dir: Path | None = None) -> Iterator[NullTracker]:
        yield self

    @contextlib.contextmanager
    def attach(self, run_id: str, spool_dir: Path | None = None) -> Iterator[NullTracker]:
        yield self

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_metric_series(self, rows: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        pass

    def flush(self) -> None:
        pass

    def metric_calls_stored(self) -> int:
        return self.metric_calls

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_datasets(self, splits: Any, data_cfg: Mapping[str, Any], name: str) -> None:
        pass

    def model_logging(self, pruned: bool = False) -> str:
        return NEVER

    def log_model(self, model: Any, input_example: Any) -> bool:
        return False
