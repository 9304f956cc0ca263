"""A Hydra sweeper that searches with Optuna ≥ 4 (every Optuna call by keyword: Optuna 5
removed positional arguments).

It reads the YAML shape of the published hydra-optuna-sweeper (``params`` written in
Hydra's override grammar: ``interval(...)``, ``int(interval(...))``, ``range(...)``,
``choice(...)``, ``tag(log, ...)``; ``sampler``, ``pruner``, ``direction``, ``n_trials``,
``n_jobs``, ``storage``, ``study_name``). Trial ``i`` of the study runs as Hydra job ``i``,
so a job finds its trial by number (in this process, or through ``storage`` from another
process) to report each epoch's metric and be pruned. With a ``storage``, rerunning the
same command loads the study and runs only the trials still missing to ``n_trials``.
One sweeping process per study: trials asked together must get consecutive numbers.

Optuna is imported inside the functions: Hydra imports every plugin module at start-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

DIRECTIONS = {"max": "maximize", "min": "minimize", "maximize": "maximize",
              "minimize": "minimize"}
PRUNED_ATTR = "pruned_at_epoch"
OVERRIDES_ATTR = "trainlab.overrides"  # a study's command-line overrides: resumed only by them
_trials: dict[tuple[str, int], Any] = {}  # (study, number) → trial, for in-process jobs


def distribution(override: Override):
    """The Optuna distribution of one swept override."""
    import optuna.distributions as d

    value = override.value()
    log_scale = "log" in getattr(value, "tags", ())
    if isinstance(value, ChoiceSweep):
        return d.CategoricalDistribution(choices=list(value.list))
    if isinstance(value, RangeSweep):
        if all(isinstance(x, int) for x in (value.start, value.stop, value.step)):
            return d.IntDistribution(low=value.start, high=value.stop - 1, step=value.step)
        last = value.start + value.step * int((value.stop - value.start) / value.step - 1e-9)
        return d.FloatDistribution(low=value.start, high=last, step=value.step)
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return d.IntDistribution(low=value.start, high=value.end, log=log_scale)
        return d.FloatDistribution(low=value.start, high=value.end, log=log_scale)
    raise ValueError(f"{override.input_line}: Optuna cannot search a {type(value).__name__}")


def search_space(params: Mapping[str, Any], arguments: Sequence[str]):
    """Split ``params`` and command-line overrides into distributions and fixed overrides."""
    lines = [f"{key}={value}" for key, value in params.items()] + list(arguments)
    space, fixed = {}, []
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed.append(f"{key}={override.get_value_element_as_str()}")
    return space, fixed


class OptunaSweeper(Sweeper):
    """Asks Optuna for ``n_jobs`` trials at a time, launches them as jobs, tells the results."""

    def __init__(
        self,
        sampler: Any = None,
        pruner: Any = None,
        direction: str = "maximize",
        study_name: str | None = None,
        storage: str | None = None,
        n_trials: int = 10,
        n_jobs: int = 1,
        max_failure_rate: float = 0.0,
        heartbeat_s: int = 30,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"hydra.sweeper.direction={direction!r}; choose one of "
                             f"{sorted(DIRECTIONS)}")
        self.sampler, self.pruner = sampler, pruner  # Hydra instantiated them already
        self.direction = DIRECTIONS[direction]
        self.study_name, self.storage = study_name, storage
        self.n_trials, self.n_jobs = int(n_trials), max(1, int(n_jobs))
        self.max_failure_rate = float(max_failure_rate)
        self.heartbeat_s = int(heartbeat_s)
        self.params = dict(params or {})

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        import warnings

        from optuna.exceptions import ExperimentalWarning

        with warnings.catch_warnings():
            # Heartbeats and stale-trial retries are "experimental" in Optuna and it warns
            # that they are meant for Study.optimize; both work with ask/tell as used here.
            warnings.filterwarnings("ignore", category=ExperimentalWarning)
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            return self._sweep(arguments)

    def _sweep(self, arguments: list[str]) -> Any:
        """Run trials until the study holds ``n_trials`` (counting every process's trials).

        A resumed study goes on where it stopped: the sampler is reseeded (a restarted
        generator would propose the first trials again), a proposal equal to a finished
        trial is answered from that trial instead of trained again, and a trial whose
        process died (no heartbeat) or was interrupted is queued to run again.
        """
        from optuna.storages import fail_stale_trials

        space, fixed = search_space(self.params, arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        study = load_study(self.sampler, self.pruner, self.study_name,
                           rdb_storage(self.storage, self.heartbeat_s), self.direction,
                           create=True)
        same_command(study, list(arguments))
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        fail_stale_trials(study)
        budget = self.n_trials - counted(study)
        if counted(study):
            log.info("Study %s resumed: %d trials done, %d to go", study.study_name,
                     counted(study), max(budget, 0))
            if hasattr(self.sampler, "reseed_rng"):
                self.sampler.reseed_rng()
        asked, launched, failures = 0, 0, []
        # Other processes may work on the same study: what is left is counted each time.
        while asked < budget and (room := self.n_trials - counted(study)) > 0:
            trials = [study.ask(fixed_distributions=space)
                      for _ in range(min(self.n_jobs, room, budget - asked))]
            asked += len(trials)
            trials = within_n_trials(study, trials, self.n_trials)
            if not trials:
                break
            for chunk in consecutive([t for t in trials
                                      if not answered_from_earlier(study, t)]):
                failures += self._launch(study, chunk, fixed)
                launched += len(chunk)
        self._save_best(study, sweep_dir)
        if failures and len(failures) / launched > self.max_failure_rate:
            _ = failures[0].return_value  # re-raises the first failed job's error
        return study

    def _launch(self, study, trials: list, fixed: list[str]) -> list:
        """Run ``trials`` as Hydra jobs numbered like the trials; tell Optuna how each ended.

        Interrupted (Ctrl-C, SIGTERM, an error in the launcher), the trials are failed and
        queued again, so the next run of the command retries them first.
        """
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        batch = [fixed + [f"{key}={value}" for key, value in t.params.items()] for t in trials]
        for trial in trials:
            _trials[(study.study_name, trial.number)] = trial
        try:
            with Heartbeat(study, trials, self.heartbeat_s):
                results = self.launcher.launch(batch, initial_job_idx=trials[0].number)
        except BaseException:
            for trial in trials:
                study.tell(trial=trial, state=TrialState.FAIL)
                study.enqueue_trial(params=trial.params, user_attrs={"retry_of": trial.number})
            raise
        finally:
            for trial in trials:
                _trials.pop((study.study_name, trial.number), None)
        running = {t.number: t for t in study.get_trials(states=(TrialState.RUNNING,))}
        failures = []
        for trial, result in zip(trials, results, strict=True):
            if result.status == JobStatus.FAILED:
                study.tell(trial=trial, state=TrialState.FAIL)
                failures.append(result)
            elif PRUNED_ATTR in running[trial.number].user_attrs:
                study.tell(trial=trial, state=TrialState.PRUNED)
            else:
                study.tell(trial=trial, values=float(result.return_value))
        return failures

    def _save_best(self, study, sweep_dir: Path) -> None:
        from optuna.trial import TrialState

        if not study.get_trials(states=(TrialState.COMPLETE,)):
            log.warning("Study %s has no completed trial", study.study_name)
            return
        best = study.best_trial
        results = {"name": "optuna", "study_name": study.study_name,
                   "best_trial": best.number, "best_params": best.params,
                   "best_value": best.value}
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        log.info("Best trial %d: %s = %s", best.number, best.params, best.value)
        save_study_plots(study, sweep_dir / "plots")

    @staticmethod
    def job_callbacks(hydra_cfg: DictConfig) -> list[Any]:
        """In a job: the pruning callback bound to this job's trial."""
        import optuna
        from hydra.utils import instantiate

        cfg = hydra_cfg.sweeper
        trial = _trials.get((cfg.study_name, hydra_cfg.job.num))
        if trial is None and cfg.storage:
            study = load_study(None, instantiate(cfg.pruner), cfg.study_name, cfg.storage,
                               DIRECTIONS[cfg.direction])
            frozen = next(t for t in study.get_trials(deepcopy=False)
                          if t.number == hydra_cfg.job.num)
            trial = optuna.Trial(study=study, trial_id=frozen._trial_id)
        if trial is None:
            log.warning("No Optuna trial for job %d (storage is null and the launcher runs "
                        "jobs in other processes): pruning is off", hydra_cfg.job.num)
            return []
        return [OptunaPruning(trial)]


def rdb_storage(url: str | None, heartbeat_s: int):
    """A database storage whose running trials send heartbeats, so that a trial whose
    process died is failed and queued again (Optuna's stale-trial retry)."""
    import optuna

    if not url:
        return None
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    callback = ({"heartbeat_stale_trial_callback": retry(max_retry=3)} if retry else
                {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=3)})
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    def open_storage():
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s,
                                          grace_period=3 * heartbeat_s, **callback)

    for attempt in range(1, 5):
        try:
            return open_storage()
        except (IntegrityError, ProgrammingError):
            # a process started beside this one is creating the same tables in a new
            # database (PostgreSQL's CREATE TYPE is not idempotent): theirs will do
            time.sleep(0.5 * attempt)
    return open_storage()  # the last try reports what it meets


def same_command(study, overrides: list[str]) -> None:
    """A study goes on only under the overrides it started with (``seed`` aside): trials of
    another config (``model=cnn`` instead of ``mlp``, more epochs) would be ranked with its
    own. Refused in one line naming what changed, before any trial is asked."""
    from trainlab.errors import TrainlabError
    from trainlab.sweeps import STUDY_FREE_KEYS, changed_overrides, refuse

    before = study.user_attrs.get(OVERRIDES_ATTR)
    if before is None:
        study.set_user_attr(OVERRIDES_ATTR, overrides)
    elif changed := changed_overrides(before, overrides, STUDY_FREE_KEYS):
        refuse(TrainlabError(
            f"study {study.study_name} was run with other overrides ({changed}); rerun its "
            "own command to resume it, or give this one a new hydra.sweeper.study_name"))


def within_n_trials(study, trials: list, n_trials: int) -> list:
    """``trials`` that fit in ``n_trials``: another process may have asked for the last
    places at the same moment. Trial numbers decide; one beyond is failed unrun (tagged
    ``beyond_n_trials``), so the study holds exactly ``n_trials``."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    taken = sorted(t.number for t in study.get_trials(deepcopy=False, states=states))
    kept = []
    for trial in trials:
        if taken.index(trial.number) < n_trials:
            kept.append(trial)
        else:
            trial.set_user_attr("beyond_n_trials", True)
            study.tell(trial=trial, state=TrialState.FAIL)
    return kept


def counted(study) -> int:
    """Trials that use up ``n_trials``: complete, pruned, or running somewhere."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return len(study.get_trials(deepcopy=False, states=states))


def answered_from_earlier(study, trial) -> bool:
    """A proposal equal to a finished trial gets that trial's result instead of a rerun."""
    from optuna.trial import TrialState

    for earlier in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                               TrialState.PRUNED)):
        if earlier.params == trial.params and earlier.number != trial.number:
            trial.set_user_attr("same_as_trial", earlier.number)
            if earlier.state == TrialState.PRUNED:
                study.tell(trial=trial, state=TrialState.PRUNED)
            else:
                study.tell(trial=trial, values=earlier.value)
            log.info("Trial %d repeats trial %d (%s): not run again", trial.number,
                     earlier.number, trial.params)
            return True
    return False


def consecutive(trials: list) -> list[list]:
    """Split trials into runs of consecutive numbers: Hydra numbers a batch's jobs from its
    first index on, and a job finds its trial by that number."""
    chunks: list[list] = []
    for trial in sorted(trials, key=lambda t: t.number):
        if chunks and chunks[-1][-1].number + 1 == trial.number:
            chunks[-1].append(trial)
        else:
            chunks.append([trial])
    return chunks


class Heartbeat:
    """Records a heartbeat for running trials every ``interval_s`` while their jobs run."""

    def __init__(self, study, trials: list, interval_s: int) -> None:
        import threading

        self.storage, self.interval_s = study._storage, interval_s
        self.trial_ids = [t._trial_id for t in trials]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            for trial_id in self.trial_ids:
                self.storage.record_heartbeat(trial_id)
            if self.stop.wait(self.interval_s):
                return

    def __enter__(self) -> Heartbeat:
        if hasattr(self.storage, "record_heartbeat") and self.storage.get_heartbeat_interval():
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def save_study_plots(study, folder: Path) -> None:
    """Optuna's optimisation history, parameter importances and parallel coordinates as
    PNGs (the sweep's parent run shows them)."""
    import warnings

    from optuna.visualization import matplotlib as plots

    from trainlab.plots import pyplot, save_figure

    pyplot()
    for name, draw in (("optuna_history", plots.plot_optimization_history),
                       ("optuna_importances", plots.plot_param_importances),
                       ("optuna_parallel_coordinate", plots.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" warnings of optuna's plots
                ax = draw(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances need two trials
            log.info("no %s plot: %s", name, err)
            continue
        figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        save_figure(figure, folder / f"{name}.png", dpi=110)


def load_study(sampler, pruner, name, storage, direction, create: bool = False):
    """The study in ``storage`` (created when ``create``), with its sampler and pruner."""
    import optuna

    pruner = pruner or optuna.pruners.NopPruner()
    if create:
        return optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                   pruner=pruner, direction=direction, load_if_exists=True)
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


class OptunaPruning:
    """Runner callback: reports the monitored metric each epoch; stops the job if pruned."""

    def __init__(self, trial) -> None:
        self.trial = trial
        self.pruned_at: int | None = None  # the epoch it stopped at: no model is logged

    def on_epoch_end(self, runner, epoch: int, metrics: Mapping[str, float]) -> None:
        self.trial.report(value=float(metrics[runner.monitor]), step=epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch + 1
            self.trial.set_user_attr(key=PRUNED_ATTR, value=epoch + 1)
            runner.tracker.set_tags({"pruned": f"epoch {epoch + 1}"})
            runner.should_stop = True
