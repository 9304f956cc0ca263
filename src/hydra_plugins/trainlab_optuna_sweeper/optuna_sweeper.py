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
        self.params = dict(params or {})

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        space, fixed = search_space(self.params, arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study = load_study(self.sampler, self.pruner, self.study_name, self.storage,
                           self.direction, create=True)
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(trial=stale.number, state=TrialState.FAIL)  # left by an interrupted run
        done = len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
        remaining = self.n_trials - done
        if done:
            log.info("Study %s resumed: %d trials done, %d to go", study.study_name, done,
                     max(remaining, 0))
        launched, failures = 0, []
        while remaining > 0:
            trials = [study.ask(fixed_distributions=space)
                      for _ in range(min(self.n_jobs, remaining))]
            batch = [fixed + [f"{key}={value}" for key, value in t.params.items()]
                     for t in trials]
            for trial in trials:
                _trials[(study.study_name, trial.number)] = trial
            try:
                results = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            finally:
                for trial in trials:
                    _trials.pop((study.study_name, trial.number), None)
            running = {t.number: t for t in study.get_trials(states=(TrialState.RUNNING,))}
            for trial, result in zip(trials, results, strict=True):
                if result.status == JobStatus.FAILED:
                    study.tell(trial=trial, state=TrialState.FAIL)
                    failures.append(result)
                elif PRUNED_ATTR in running[trial.number].user_attrs:
                    study.tell(trial=trial, state=TrialState.PRUNED)
                else:
                    study.tell(trial=trial, values=float(result.return_value))
            remaining -= len(trials)
            launched += len(trials)
        self._save_best(study, sweep_dir)
        if failures and len(failures) / launched > self.max_failure_rate:
            _ = failures[0].return_value  # re-raises the first failed job's error
        return study

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

    def on_epoch_end(self, runner, epoch: int, metrics: Mapping[str, float]) -> None:
        self.trial.report(value=float(metrics[runner.monitor]), step=epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr(key=PRUNED_ATTR, value=epoch + 1)
            runner.tracker.set_tags({"pruned": f"epoch {epoch + 1}"})
            runner.should_stop = True
