"""A sweep's model: with ``logger.log_model=best`` (the default) a sweep logs one MLflow model,
its best job's.

While the sweep runs, each job keeps its best epoch in its ``checkpoints/best.pt`` with an
input example beside it and logs no model. When the sweep ends, the summary names the best
job, and :func:`log_best_job_model` logs that job's weights into the job's own run, registered
as ``logger.register_model`` when that is set (the sweep then makes it the champion).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from trainlab.errors import TrainlabError

log = logging.getLogger(__name__)


def log_best_job_model(client: Any, run_id: str, logger_cfg: dict[str, Any]) -> None:
    """Log run ``run_id``'s best checkpoint as its model, built from the run's own config
    the way `trainlab eval` builds it. A run that has its model already keeps it (a rerun
    sweep); a checkpoint not on this machine, or a store that refuses the model, is a
    warning: the sweep's summary and status do not depend on it."""
    import mlflow
    import numpy as np
    from hydra.utils import instantiate
    from mlflow.exceptions import MlflowException

    from trainlab.checkpoint import INPUT_EXAMPLE, MODEL_EPOCH_TAG, load_checkpoint
    from trainlab.inference import find_source, load_model

    run = client.get_run(run_id)
    if MODEL_EPOCH_TAG in run.data.tags:
        return
    with tempfile.TemporaryDirectory() as workdir:
        try:
            source = find_source({"run_id": run_id}, [], Path(workdir))
            example = source.checkpoint.parent / INPUT_EXAMPLE
            if not example.is_file():
                raise TrainlabError(f"no {example} beside its checkpoint")
            model = load_model(source.cfg, source.checkpoint)
            best_epoch = int(load_checkpoint(source.checkpoint)["best_epoch"])
        except TrainlabError as err:
            log.warning("the model of the sweep's best job (run %s) is not logged: %s",
                        run_id, err)
            return
        while mlflow.active_run() is not None:
            mlflow.end_run()
        try:
            with mlflow.start_run(run_id=run_id, log_system_metrics=False):
                instantiate(logger_cfg).log_model(model.cpu(), np.load(example))
        except (MlflowException, OSError) as err:
            log.warning("the model of the sweep's best job (run %s) could not be logged: %s",
                        run_id, str(err).splitlines()[0])
            return
        finally:  # reopening the run to log into it must not move its status or its end
            client.set_terminated(run_id, run.info.status, end_time=run.info.end_time)
    client.set_tag(run_id, MODEL_EPOCH_TAG, best_epoch + 1)
    log.info("logged the model of the sweep's best job %s (run %s)", run.info.run_name, run_id)
