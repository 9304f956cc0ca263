"""trainlab's submitit launchers (``hydra/launcher=slurm|slurm_local``): jobs that requeue
themselves when preempted and resume their own MLflow run."""
