"""A run's model logged after the run ended, rebuilt from the run's config and best checkpoint.

Two runs get their model this way: a sweep's best job (``logger.log_model=best``: while the
sweep runs, each job keeps its best epoch in ``checkpoints/best.pt`` with an input example
beside it and logs no model; the sweep logs its best job's when it ends), and a run whose
tracking server did not answer when the model was due (the spool records the model as owed;
the run logs it if the server answers again before the run closes, else `trainlab sync`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from trainlab.errors import TrainlabError

log = logging.getLogger(__name__)


def log_model_later(client: Any, run_id: str, tracker: Any, example: Path | None = None) -> bool:
    """Log run ``run_id``'s best checkpoint as its model with ``tracker.log_model`` (its
    format and registry name), built from the run's own config the way `trainlab eval`
    builds it; ``example`` is the input example (default: the one beside the checkpoint).

    Returns False when the run has this epoch's model already (nothing is logged twice). The run's
    status and end time stay as they were. A checkpoint not on this machine, or a store that
    refuses the model, is a ``TrainlabError``.
    """
    import mlflow
    import numpy as np
    import requests
    from mlflow.exceptions import MlflowException

    from trainlab.checkpoint import INPUT_EXAMPLE, MODEL_EPOCH_TAG, load_checkpoint
    from trainlab.inference import find_source, load_model

    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as workdir:
        source = find_source({"run_id": run_id, "tracking_uri": client.tracking_uri}, [],
                             Path(workdir))
        best_epoch = int(load_checkpoint(source.checkpoint)["best_epoch"])
        # the same epoch's model is there already (a resumed run that trained on has not)
        if run.data.tags.get(MODEL_EPOCH_TAG) == str(best_epoch + 1):
            return False
        example = example or source.checkpoint.parent / INPUT_EXAMPLE
        if not example.is_file():
            raise TrainlabError(f"no input example {example} for the model of run {run_id}")
        model = load_model(source.cfg, source.checkpoint)
        while mlflow.active_run() is not None:
            mlflow.end_run()
        try:
            with mlflow.start_run(run_id=run_id, log_system_metrics=False):
                tracker.log_model(model.cpu(), np.load(example))
            client.set_tag(run_id, MODEL_EPOCH_TAG, best_epoch + 1)
        except (MlflowException, OSError, requests.RequestException) as err:
            raise TrainlabError(f"the model of run {run_id} could not be logged: "
                                f"{str(err).splitlines()[0]}") from err
        finally:  # reopening the run to log into it must not move its status or its end
            with contextlib.suppress(Exception):  # a store gone mid-way: raised above
                client.set_terminated(run_id, run.info.status, end_time=run.info.end_time)
    log.info("logged the model of run %s (%s), epoch %d", run.info.run_name, run_id,
             best_epoch + 1)
    return True


def log_owed_model(spool_dir: Path, client: Any, run_id: str, tracker: Any) -> bool:
    """Log the model the spool in ``spool_dir`` says run ``run_id`` still owes, with
    ``tracker`` (made with the settings recorded there, ``outbox.owed_model``); the record
    goes once the store has the model (False: it had it already). A ``TrainlabError``
    leaves the record for another try."""
    from trainlab.outbox import OWED_EXAMPLE, drop_owed_model

    logged = log_model_later(client, run_id, tracker, spool_dir / OWED_EXAMPLE)
    drop_owed_model(spool_dir)
    return logged


def log_model_if_owed(spool_dir: Path, tracker: Any) -> None:
    """Once a run has closed: a model it owes (the server was down when it was due) is
    logged now if the server took every other call; otherwise `trainlab sync` logs it."""
    from trainlab.outbox import owed_model, remove_if_empty

    if owed_model(spool_dir) is None or any(spool_dir.glob("*.jsonl")):
        return
    from mlflow.tracking import MlflowClient

    try:
        log_owed_model(spool_dir, MlflowClient(), tracker.run_id, tracker)
    except TrainlabError as err:
        print(f"warning: {err}; `trainlab sync {spool_dir.parent}` logs it later",
              file=sys.stderr, flush=True)
        return
    remove_if_empty(spool_dir)
    print(f"MLflow took the run's model (run {tracker.run_id})", file=sys.stderr, flush=True)
