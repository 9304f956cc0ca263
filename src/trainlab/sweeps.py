"""Multirun into MLflow: one parent run per sweep, every job a child run, a summary at the end.

``MlflowSweep`` is a Hydra callback (registered in conf/hydra/default.yaml). It runs in the
sweeping process, and Hydra hands a copy of it to every job, also to jobs in other
processes (joblib, submitit): ``on_job_start`` tells the job its parent run and which
overrides were swept, through ``tracking.PARENT_RUN_ENV`` and this module's ``_swept`` keys.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

OPTUNA_RESULTS = "optimization_results.yaml"  # written by the Optuna sweeper in the sweep dir
_swept: set[str] = set()  # keys swept by the sweep this job belongs to
_open: list[MlflowSweep] = []  # sweeps not summarised yet (Hydra skips the end on errors)


def override_key(override: str) -> str:
    """``+optimizer.lr=0.1`` → ``optimizer.lr``."""
    return override.split("=", 1)[0].lstrip("+~")


def swept_keys(overrides: list[str], sweeper: DictConfig | None) -> set[str]:
    """Keys a sweep varies: ``a=1,2`` / ``choice(...)`` on the command line, sweeper ``params``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    keys = {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}
    params = (sweeper or {}).get("params") or {}
    return keys | set(params)


def run_name(task_overrides: list[str]) -> str | None:
    """A sweep job's run name: only its swept overrides (``loss=focal,optimizer.lr=0.01``)."""
    swept = [o for o in task_overrides if override_key(o) in _swept]
    return ",".join(swept) or None


def job_callbacks(hydra_cfg: DictConfig) -> list[Any]:
    """Epoch-end callbacks the sweeper asks its jobs to run (Optuna: report and prune)."""
    from hydra.utils import get_class

    target = OmegaConf.select(hydra_cfg, "sweeper._target_")
    factory = getattr(get_class(target), "job_callbacks", None) if target else None
    return list(factory(hydra_cfg)) if factory else []


class MlflowSweep(Callback):
    """Opens a sweep's parent run, nests the jobs under it and logs the summary to it."""

    def __init__(self, summary: bool = True) -> None:
        self.summary = summary
        self.parent_run_id: str | None = None
        self.swept: set[str] = set()
        self.monitor = ("val/acc", "max")
        self.register_model: str | None = None  # its best job's version becomes the champion

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.utils import instantiate

        overrides = list(config.hydra.overrides.task)
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        # Creating the experiment here, once, keeps parallel jobs from racing to create it.
        experiment_id = instantiate(config.logger).connect()
        if experiment_id is None:  # logger=none: nothing to nest the jobs under
            return
        from mlflow.tracking import MlflowClient

        from trainlab.compare import SWEEP_ROLE_TAG

        self.swept = swept_keys(overrides, config.hydra.sweeper)
        self.monitor = (config.trainer.monitor, config.trainer.monitor_mode)
        self.register_model = OmegaConf.select(config, "logger.register_model")
        command = shlex.join(["trainlab", "train", "-m", *overrides])
        run = MlflowClient().create_run(
            experiment_id,
            run_name=f"sweep {sweep_dir.name}",
            tags={SWEEP_ROLE_TAG: "sweep", "trainlab.sweep_dir": str(sweep_dir),
                  "trainlab.command": command, "trainlab.overrides": " ".join(overrides)},
        )
        self.parent_run_id = run.info.run_id
        _open.append(self)
        log.info("MLflow sweep run %s: %s", self.parent_run_id, command)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is None:  # a single run, not a sweep
            return
        from trainlab.tracking import PARENT_RUN_ENV

        os.environ[PARENT_RUN_ENV] = self.parent_run_id
        _swept.clear()
        _swept.update(self.swept)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is not None:  # None: logger=none, nothing to summarise
            self.finish("FINISHED")

    def finish(self, status: str) -> None:
        """Summarise the jobs into the parent run and close it with ``status``."""
        from mlflow.tracking import MlflowClient

        from trainlab import compare
        from trainlab.tracking import PARENT_RUN_ENV

        if self in _open:
            _open.remove(self)
        os.environ.pop(PARENT_RUN_ENV, None)
        client = MlflowClient()
        parent = client.get_run(self.parent_run_id)
        sweep_dir = Path(parent.data.tags["trainlab.sweep_dir"])
        metric, mode = self.monitor
        children = client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{self.parent_run_id}'"
        )
        rows = compare.rows_for(client, children, metric, mode)
        rows += compare.seed_groups(rows, mode)
        if self.summary:
            shared, short = compare.without_common_overrides(rows)
            print(f"\nSweep summary ({len(children)} jobs, MLflow run {self.parent_run_id}),"
                  f" overrides of every job: {shared or '(none)'}")
            print(compare.format_table(short, metric), flush=True)
        client.log_text(self.parent_run_id, compare.format_csv(rows, metric), "summary.csv")
        client.log_text(self.parent_run_id, compare.format_markdown(rows, metric), "summary.md")
        results = sweep_dir / OPTUNA_RESULTS
        if results.is_file():
            best = OmegaConf.load(results)
            for key, value in best.best_params.items():
                client.log_param(self.parent_run_id, f"best.{key}", value)
            client.log_metric(self.parent_run_id, f"best/{metric}", float(best.best_value))
            client.log_artifact(self.parent_run_id, str(results))
        if self.register_model:
            from trainlab.tracking import promote_champion

            version = promote_champion(client, self.register_model, children, metric, mode)
            if version is not None:
                client.set_tag(self.parent_run_id, "trainlab.champion",
                               f"{self.register_model} version {version}")
        client.set_terminated(self.parent_run_id, status)


def close_open_sweeps(status: str = "FAILED") -> None:
    """Summarise sweeps Hydra aborted (a failed job, Ctrl-C): it skips ``on_multirun_end``."""
    while _open:
        sweep = _open[-1]
        try:
            sweep.finish(status)
        except Exception as err:  # the summary must not hide the job's own error
            log.warning("could not summarise sweep %s: %s", sweep.parent_run_id, err)
            _open.remove(sweep)
