"""Multirun into MLflow: one parent run per sweep, every job a child run, a summary at the end.

``MlflowSweep`` is a Hydra callback (registered in conf/hydra/default.yaml). It runs in the
sweeping process, and Hydra hands a copy of it to every job, also to jobs in other
processes (joblib, submitit): ``on_job_start`` tells the job its parent run and which
overrides were swept, through ``tracker.PARENT_RUN_ENV`` and this module's ``_swept`` keys.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from trainlab.app import composition_problem
from trainlab.compare import short_numbers
from trainlab.config_check import override_key
from trainlab.store import BEST_RUN_TAG, STUDY_TAG, SWEEP_ROLE_TAG
from trainlab.tracker import PARENT_RUN_ENV

log = logging.getLogger(__name__)

OPTUNA_RESULTS = "optimization_results.yaml"  # written by the Optuna sweeper in the sweep dir
OPTUNA_PLOTS = "plots"  # the Optuna sweeper's figures, in the sweep dir
SWEEP_KEY_TAG = "trainlab.sweep_key"  # same key: the same sweep, rerun or on another machine
JOB_DIR_LIMIT = 120  # bytes of a job dir name; filesystems allow 255
VALUE_LIMIT = 24  # longer override values are cut in job dir names
_swept: set[str] = set()  # keys swept by the sweep this job belongs to
_open: list[MlflowSweep] = []  # sweeps not summarised yet (Hydra skips the end on errors)


def swept_keys(overrides: list[str], sweeper: DictConfig | None) -> set[str]:
    """Keys a sweep varies: ``a=1,2`` / ``choice(...)`` on the command line, sweeper ``params``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    keys = {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}
    params = (sweeper or {}).get("params") or {}
    return keys | set(params)


def job_dir_name(num: int, override_dirname: str) -> str:
    """A sweep job's folder, ``<num>_<overrides>``, that a filesystem accepts and a person
    reads: floats shortened, ``/`` made ``_``, values longer than ``VALUE_LIMIT`` cut, and
    when anything was cut or the name is still too long, a stable hash of the full name."""
    items = re.split(r",(?=[+~]?[\w./@-]+=)", short_numbers(override_dirname))
    cut = [item if len(item.split("=", 1)[-1]) <= VALUE_LIMIT
           else item[: item.index("=") + 1 + VALUE_LIMIT // 2] + "…" for item in items]
    name = f"{num}_{','.join(cut)}".replace("/", "_").rstrip("_")
    if cut == items and len(name.encode()) <= JOB_DIR_LIMIT:
        return name
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
    return f"{name.encode()[: JOB_DIR_LIMIT - 11].decode(errors='ignore')}~{digest}"


OmegaConf.register_new_resolver("trainlab_job_dir", job_dir_name, replace=True)


def run_name(task_overrides: list[str]) -> str | None:
    """A sweep job's run name: only its swept overrides (``loss=focal,optimizer.lr=0.01``)."""
    swept = [short_numbers(o) for o in task_overrides if override_key(o) in _swept]
    return ",".join(swept) or None


def sweep_size(overrides: list[str], sweeper: DictConfig | None) -> int | None:
    """Jobs a sweep launches: the grid's size, or the Optuna sweeper's ``n_trials``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if (sweeper or {}).get("n_trials") is not None:
        return int(sweeper.n_trials)
    sizes = [len(list(o.sweep_string_iterator()))
             for o in OverridesParser.create().parse_overrides(overrides)
             if o.is_sweep_override() and not o.is_interval_sweep()]
    return math.prod(sizes)


def sweep_title(swept: set[str], size: int | None, optuna: bool) -> str:
    """The parent run's name: what it sweeps and how many jobs (``loss × optimizer.lr, 4 jobs``)."""
    keys = " × ".join(sorted(swept)) or "defaults"
    unit = "trials" if optuna else "jobs"
    return f"{keys}, {size} {unit}" if size else keys


def sweep_command(config: DictConfig) -> str:
    """The command line that reproduces the sweep, Hydra's own overrides included."""
    hydra_overrides = [o for o in config.hydra.overrides.hydra
                       if not o.startswith("hydra.mode=")]
    return shlex.join(["trainlab", "train", "-m", *hydra_overrides,
                       *config.hydra.overrides.task])


def job_callbacks(hydra_cfg: DictConfig) -> list[Any]:
    """Epoch-end callbacks the sweeper asks its jobs to run (Optuna: report and prune)."""
    from hydra.utils import get_class

    target = OmegaConf.select(hydra_cfg, "sweeper._target_")
    factory = getattr(get_class(target), "job_callbacks", None) if target else None
    return list(factory(hydra_cfg)) if factory else []


GRID_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def check_every_job(config: DictConfig) -> None:
    """Compose and check every job of a grid sweep before the first one runs: a bad value in
    one job is refused at once, not found after the jobs before it trained. Each problem is
    one line, with how many jobs it affects. A search (Optuna) proposes its swept values as
    it goes: the values every trial shares are checked."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException

    from trainlab.config_check import ConfigError

    loader = GlobalHydra.instance().config_loader()
    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(
        params + list(config.hydra.overrides.task))
    grid = config.hydra.sweeper.get("_target_") == GRID_SWEEPER
    if grid:
        (jobs,) = BasicSweeper.split_arguments(parsed, None)
    else:
        jobs = [[o.input_line for o in parsed if not o.is_sweep_override()]]
    affected: dict[str, int] = {}  # each problem, in the order found: how many jobs have it
    for job in jobs:
        try:
            job_cfg = loader.load_sweep_config(config, list(job))
        except ConfigCompositionException as err:
            problems = [composition_problem(err)]
        else:
            problems = job_problems(job_cfg, list(job))
        for problem in problems:
            affected[problem] = affected.get(problem, 0) + 1
    if affected:
        raise ConfigError([
            f"{problem} ({f'{count} of {len(jobs)} jobs' if grid else 'every trial'}; "
            "none was run)" for problem, count in affected.items()])


STUDY_FREE_KEYS = ("seed",)  # each process of one study may seed its sampler its own way


def changed_overrides(before: list[str], now: list[str], free: tuple[str, ...] = ()) -> str:
    """How a sweep's overrides ``now`` differ from the ones it started with ('' when they
    are the same, but for keys in ``free``): a sweep resumes only under its own command, so
    that no summary or study ranks jobs of two configs together."""
    before, now = ([o for o in overrides if override_key(o) not in free]
                   for overrides in (before, now))
    if before == now:
        return ""
    gone, new = [o for o in before if o not in now], [o for o in now if o not in before]
    if not gone and not new:
        return "the same overrides in another order"
    return f"before: {' '.join(gone) or '(none)'}; now: {' '.join(new) or '(none)'}"


def refuse(err: Exception) -> NoReturn:
    """End the sweeping command with ``err``, one ``error:`` line per problem, before any job."""
    for line in str(err).splitlines():
        print(f"error: {line}", file=sys.stderr)
    raise SystemExit(1) from None


def job_problems(job_cfg: DictConfig, overrides: list[str]) -> list[str]:
    """What a single run of this job's config would refuse before training: the config
    check, then whether the loss fits the task (known from the config when it names
    ``data.num_classes``; else the data check infers it in the job)."""
    from hydra.utils import get_class

    from trainlab.config_check import ConfigError, check_config, resume_as_typed
    from trainlab.errors import TrainlabError
    from trainlab.losses import misfit

    choices = OmegaConf.to_container(job_cfg.hydra.runtime.choices)
    with open_dict(job_cfg):  # what the job itself gets: its config without Hydra's
        del job_cfg["hydra"]
    resume_as_typed(job_cfg, overrides)
    try:
        check_config(job_cfg, choices, overrides=overrides)
    except ConfigError as err:
        return list(err.problems)
    if job_cfg.data.get("num_classes") is None:
        return []
    try:
        loss_type = get_class(job_cfg.loss._target_)
    except (ImportError, ValueError):  # a function building the loss: its job checks it
        return []
    try:
        problem = misfit(loss_type, choices.get("loss") or job_cfg.loss._target_,
                         job_cfg.data.task, int(job_cfg.data.num_classes))
    except TrainlabError as err:
        problem = str(err)
    return [problem] if problem else []


class MlflowSweep(Callback):
    """Opens (or reopens) a sweep's parent run, nests the jobs under it, summarises into it.

    A sweep is known by its key: the sweep dir for a grid, the study for Optuna. Rerunning
    the command reopens the same parent, and several processes sweeping one study share it.
    """

    def __init__(self, summary: bool = True) -> None:
        self.summary = summary
        self.parent_run_id: str | None = None
        self.swept: set[str] = set()
        self.monitor = ("val/acc", "max")
        self.register_model: str | None = None  # its best job's version becomes the champion
        self.logger_cfg: dict[str, Any] = {}  # how the jobs log: log_model=best is logged here
        self.job_started_ms = 0  # in a job's process: when it started (its run opens after)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check every job, then open the parent run; a refusal is one line per problem and
        leaves nothing behind (no parent run, no sweep dir)."""
        from trainlab.errors import TrainlabError

        try:
            check_every_job(config)
            self._open_parent(config)
        except TrainlabError as err:
            refuse(err)

    def _open_parent(self, config: DictConfig) -> None:
        from hydra.utils import instantiate

        overrides = list(config.hydra.overrides.task)
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        # Creating the experiment here, once, keeps parallel jobs from racing to create it.
        experiment_id = instantiate(config.logger).connect()
        if experiment_id is None:  # logger=none: nothing to nest the jobs under
            return
        self.swept = swept_keys(overrides, config.hydra.sweeper)
        self.monitor = (config.trainer.monitor, config.trainer.monitor_mode)
        self.register_model = OmegaConf.select(config, "logger.register_model")
        self.logger_cfg = OmegaConf.to_container(config.logger, resolve=True)
        optuna = "n_trials" in config.hydra.sweeper
        key = sweep_key(config, sweep_dir, optuna)
        tags = {"trainlab.sweep_dir": str(sweep_dir), "trainlab.command": sweep_command(config),
                "trainlab.overrides": " ".join(overrides)}
        if optuna:  # `trainlab reproduce` starts a new study rather than resuming this one
            tags[STUDY_TAG] = config.hydra.sweeper.study_name
            held_by = (f"study {config.hydra.sweeper.study_name} in "
                       f"{config.hydra.sweeper.storage}", "hydra.sweeper.study_name",
                       STUDY_FREE_KEYS)
        else:
            held_by = (f"hydra.sweep.dir={config.hydra.sweep.dir}", "hydra.sweep.dir", ())
        self.parent_run_id = open_parent(
            experiment_id, key, tags, held_by,
            name=sweep_title(self.swept, sweep_size(overrides, config.hydra.sweeper), optuna))
        _open.append(self)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is None:  # a single run, not a sweep
            return
        os.environ[PARENT_RUN_ENV] = self.parent_run_id
        _swept.clear()
        _swept.update(self.swept)
        self.job_started_ms = int(time.time() * 1000)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """A job that failed before its MLflow run opened (a data file it cannot read, an
        error in its own code) becomes a FAILED child run holding its error line, so the
        summary counts and lists it like any failed job."""
        from hydra.core.utils import JobStatus
        from mlflow.tracking import MlflowClient

        if self.parent_run_id is None or job_return.status != JobStatus.FAILED:
            return
        client = MlflowClient()
        output_dir = str(Path(config.hydra.runtime.output_dir).resolve())
        experiment = client.get_run(self.parent_run_id).info.experiment_id
        opened = client.search_runs([experiment], " and ".join([
            f"tags.mlflow.parentRunId = '{self.parent_run_id}'",
            f"tags.`trainlab.output_dir` = '{output_dir}'",
            f"attributes.start_time >= {self.job_started_ms}"]))
        if opened:
            return
        err = job_return._return_value  # Hydra's getter would raise it
        line = str(err).removeprefix("error: ") if isinstance(err, CompactHydraException) \
            else f"{type(err).__name__}: {err}"
        overrides = list(config.hydra.overrides.task)
        run = client.create_run(experiment, run_name=run_name(overrides), tags={
            "mlflow.parentRunId": self.parent_run_id, "trainlab.error": line[:5000],
            "trainlab.overrides": " ".join(overrides) or "(none)",
            "trainlab.output_dir": output_dir})
        client.set_terminated(run.info.run_id, "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is not None:  # None: logger=none, nothing to summarise
            self.finish("FINISHED")

    def finish(self, status: str) -> None:
        """Summarise the jobs into the parent run and close it with ``status``.

        A parent that got no job at all is deleted (it holds nothing but the error, which
        the command printed). While another process still runs jobs of the same sweep,
        the parent stays open: the last one to finish closes it.
        """
        from mlflow.tracking import MlflowClient

        from trainlab import compare

        if self in _open:
            _open.remove(self)
        os.environ.pop(PARENT_RUN_ENV, None)
        client = MlflowClient()
        parent = client.get_run(self.parent_run_id)
        children = compare.latest_attempts(client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{self.parent_run_id}'"
        ))
        if not children:
            client.delete_run(self.parent_run_id)
            log.info("sweep ended before any job; its MLflow parent run was removed")
            return
        metric, mode = self.monitor
        rows = compare.rows_for(client, children, metric, mode)
        seeds = compare.seed_groups(rows, mode)
        shared, short = compare.without_common_overrides(rows + seeds)
        if self.summary:
            print(f"\nSweep summary ({len(children)} jobs, MLflow run {self.parent_run_id}),"
                  f" overrides of every job: {shared or '(none)'}")
            print(compare.format_table(short, metric, shutil.get_terminal_size().columns),
                  flush=True)
        client.log_text(self.parent_run_id, compare.format_csv(rows + seeds, metric),
                        "summary.csv")
        client.log_text(self.parent_run_id, compare.format_markdown(short, metric, shared),
                        "summary.md")
        best_run = log_parent_results(client, self.parent_run_id, rows, seeds, metric)
        running = any(r.info.status == "RUNNING" for r in children)  # in another process
        if best_run and not running and status != "KILLED" and self.logs_best_model_only():
            log_best_job_model(client, best_run, self.logger_cfg)
        sweep_dir = Path(parent.data.tags["trainlab.sweep_dir"])
        results = sweep_dir / OPTUNA_RESULTS
        if results.is_file():
            best = OmegaConf.load(results)
            client.set_tag(self.parent_run_id, STUDY_TAG, best.study_name)
            for key, value in best.best_params.items():
                client.set_tag(self.parent_run_id, f"best.{key}", value)
            client.log_artifact(self.parent_run_id, str(results))
        if (sweep_dir / OPTUNA_PLOTS).is_dir():
            client.log_artifacts(self.parent_run_id, str(sweep_dir / OPTUNA_PLOTS), "plots")
        if self.register_model:
            from trainlab.tracking import promote_champion

            version = promote_champion(client, self.register_model, children, metric, mode)
            if version is not None:
                client.set_tag(self.parent_run_id, "trainlab.champion",
                               f"{self.register_model} version {version}")
        if running and status == "FINISHED":
            return  # another process is still sweeping: it closes the parent
        client.set_terminated(self.parent_run_id, status)


    def logs_best_model_only(self) -> bool:
        """``logger.log_model=best``: the jobs log no model; the sweep logs its best job's."""
        from trainlab.tracker import log_model_choice

        return log_model_choice(self.logger_cfg.get("log_model", False)) == "best"


def log_best_job_model(client, run_id: str, logger_cfg: dict[str, Any]) -> None:
    """``logger.log_model=best``: the sweep's best job's model, logged into the job's run
    (registered as ``logger.register_model`` when set). A model that cannot be logged is a
    warning: the sweep's summary and status do not depend on it."""
    from hydra.utils import instantiate

    from trainlab.errors import TrainlabError
    from trainlab.late_model import log_model_later

    try:
        log_model_later(client, run_id, instantiate(logger_cfg))
    except TrainlabError as err:
        log.warning("the model of the sweep's best job (run %s) is not logged: %s", run_id, err)


def sweep_key(config: DictConfig, sweep_dir: Path, optuna: bool) -> str:
    """What makes two sweeping commands the same sweep: the study, else the sweep dir."""
    if optuna and config.hydra.sweeper.get("storage"):
        where = f"{config.hydra.sweeper.storage}#{config.hydra.sweeper.study_name}"
    else:
        where = str(sweep_dir)
    return hashlib.sha1(where.encode()).hexdigest()[:16]


def open_parent(experiment_id: str, key: str, tags: dict[str, str],
                held_by: tuple[str, str, tuple[str, ...]], name: str) -> str:
    """The parent run with ``key``, reopened, or a new one.

    Reopened only by the command that started it: ``held_by`` names what holds the sweep
    (its sweep dir or study) and the option that would start another, for the refusal,
    and the override keys that may differ.

    Processes that start one sweep together may each create a parent; all of them then
    agree on the oldest and the others delete theirs.
    """
    from mlflow.tracking import MlflowClient

    from trainlab.errors import TrainlabError

    client = MlflowClient()
    query = f"tags.`{SWEEP_KEY_TAG}` = '{key}'"
    found = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"])
    if found:
        run_id = found[0].info.run_id
        where, option, free = held_by
        changed = changed_overrides(found[0].data.tags.get("trainlab.overrides", "").split(),
                                    tags["trainlab.overrides"].split(), free)
        if changed:
            raise TrainlabError(
                f"{where} holds the sweep {found[0].info.run_name!r} (MLflow run "
                f"{run_id[:8]}) of other overrides ({changed}); rerun its own command to "
                f"resume it, or give this one a new {option}")
        client.update_run(run_id, status="RUNNING", name=name)
        log.info("MLflow sweep run %s reopened: %s", run_id, tags["trainlab.command"])
        return run_id
    mine = client.create_run(experiment_id, run_name=name,
                             tags={**tags, SWEEP_ROLE_TAG: "sweep", SWEEP_KEY_TAG: key})
    runs = client.search_runs([experiment_id], query)
    oldest = min(runs, key=lambda r: (r.info.start_time, r.info.run_id))
    if oldest.info.run_id != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    log.info("MLflow sweep run %s: %s", oldest.info.run_id, tags["trainlab.command"])
    return oldest.info.run_id


def log_parent_results(client, parent_id: str, rows, seeds, metric: str) -> str | None:
    """Metrics to sort parents by: ``best/<metric>`` and each seed group's mean and std,
    plus the best child run's id and name as tags; returns that id (None: no job finished)."""
    from mlflow.entities import Metric

    from trainlab.compare import metric_key

    ranked = [r for r in rows if r.best is not None and r.status == "FINISHED"]
    metrics = []
    if ranked:
        best = ranked[0]
        metrics.append((f"best/{metric}", best.best))
        client.set_tag(parent_id, BEST_RUN_TAG, best.run_id)
        client.set_tag(parent_id, f"{BEST_RUN_TAG}_name", best.run)
    for group in seeds:
        name = metric_key(group.run)
        metrics += [(f"seeds/{name}/{metric}_mean", group.best),
                    (f"seeds/{name}/{metric}_std", group.std)]
    stamp = int(time.time() * 1000)
    client.log_batch(parent_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics])
    return ranked[0].run_id if ranked else None


def finished_job(hydra_cfg: DictConfig, monitor: str, mode: str) -> float | None:
    """In a rerun sweep: the best value of this job's FINISHED earlier attempt, if any.

    The job then skips training; a failed or killed attempt is trained again.
    """
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    overrides = " ".join(hydra_cfg.overrides.task) or "(none)"
    experiment = client.get_run(parent).info.experiment_id
    done = [r for r in client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'FINISHED'")
        if r.data.tags.get("trainlab.overrides") == overrides and "pruned" not in r.data.tags]
    values = [m.value for run in done[-1:]
              for m in client.get_metric_history(run.info.run_id, monitor)
              if math.isfinite(m.value)]
    if not values:  # no earlier attempt, or one that never validated
        return None
    log.info("job %s finished in an earlier attempt (run %s): skipped", overrides,
             done[-1].info.run_id)
    return min(values) if mode == "min" else max(values)


def close_open_sweeps(status: str = "FAILED") -> None:
    """Summarise sweeps Hydra aborted (a failed job, Ctrl-C): it skips ``on_multirun_end``."""
    while _open:
        sweep = _open[-1]
        try:
            sweep.finish(status)
        except Exception as err:  # the summary must not hide the job's own error
            log.warning("could not summarise sweep %s: %s", sweep.parent_run_id, err)
            if sweep in _open:
                _open.remove(sweep)
