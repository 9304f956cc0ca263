"""Preemption and time limits on a cluster: hydra-submitit-launcher's launchers whose jobs
checkpoint, requeue themselves and resume their own MLflow run.

Slurm warns a job with a signal (``--signal=USR2@<signal_delay_s>``) before it preempts it
or its time limit ends. In a job of these launchers that signal stops the run as SIGTERM
does (trainlab.signals): ``last.pt`` at the next step, the MLflow run closed KILLED. Then
submitit's own protocol takes over: it calls the launcher's ``checkpoint()``, which hands
back the same job with ``trainer.resume`` set to that ``last.pt``, and requeues it. The
requeued job reopens the same MLflow run and continues at the step the signal stopped, in
the same job dir, with the same overrides (so its run name and the sweep's bookkeeping do
not change).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, run_job, setup_globals
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import open_dict

from trainlab.signals import preemption


class _Requeueing:
    """The job side of a submitit launcher, made to resume after a requeue."""

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int,
                 job_id: str, singleton_state: dict, resume: str | None = None) -> JobReturn:
        """Run one sweep job (as hydra-submitit-launcher does), from ``resume`` when this is
        a requeued attempt."""
        import submitit

        Singleton.set_state(singleton_state)
        setup_globals()
        config = self.hydra_context.config_loader.load_sweep_config(self.config,
                                                                     sweep_overrides)
        with open_dict(config):
            config.hydra.job.id = submitit.JobEnvironment().job_id
            config.hydra.job.num = job_num
            if resume:
                config.trainer.resume = resume
        warning = submitit.JobEnvironment._usr_sig()
        requeue = signal.getsignal(warning)  # submitit's checkpoint-and-requeue handler
        self._resume_next = None
        with preemption(warning) as stopped:
            try:
                return run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                               config=config, job_dir_key=job_dir_key,
                               job_subdir_key="hydra.sweep.subdir")
            except KeyboardInterrupt:
                if not (stopped.received and callable(requeue)):
                    raise
        # run_job noted the job's folder; a resumed run writes where its checkpoint was
        folder = Path(resume).parent.parent if resume else Path(config.hydra.runtime.output_dir)
        last = folder / "checkpoints" / "last.pt"
        self._resume_next = str(last.resolve()) if last.is_file() else None
        requeue(warning, None)  # calls checkpoint(), requeues and exits (or raises: too many
        raise KeyboardInterrupt  # time-outs); it returns in the other tasks of a multi-task job

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The same job again, resuming from the ``last.pt`` the stopped attempt wrote."""
        import submitit

        sweep_overrides, job_dir_key, job_num, job_id, singleton_state = args[:5]
        return submitit.helpers.DelayedSubmission(
            self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state,
            resume=getattr(self, "_resume_next", None) or kwargs.get("resume"))


class SlurmLauncher(_Requeueing, submitit_launcher.SlurmLauncher):
    """``hydra/launcher=slurm``: Slurm jobs that requeue themselves when preempted."""


class LocalLauncher(_Requeueing, submitit_launcher.LocalLauncher):
    """``hydra/launcher=slurm_local``: the same jobs as local processes (submitit's local
    executor sends the warning signal before ``timeout_min`` too), to try a setup without a
    cluster."""
