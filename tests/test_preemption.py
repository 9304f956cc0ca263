"""Preemption under submitit (`hydra/launcher=slurm_local`, Slurm's protocol on local
processes): the warning signal makes the job write its checkpoint and requeue itself, and
the requeued job finishes the same MLflow run with every epoch logged once."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from conftest import FAST, TRAINLAB, runs_of

EPOCHS = 4


def job_process(sweeper: subprocess.Popen) -> psutil.Process:
    """The process running the sweep's job (submitit's task), once it is there."""
    while True:
        for child in psutil.Process(sweeper.pid).children(recursive=True):
            if "submitit.core._submit" in " ".join(child.cmdline()):
                return child
        assert sweeper.poll() is None, "the sweep ended before its job started"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_preempted_job_checkpoints_requeues_and_finishes_its_own_run(
    mlflow_client, tmp_path, tracking_uri
):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        sweeper = subprocess.Popen(
            [str(TRAINLAB), "train", "-m", "hydra/launcher=slurm_local", "optimizer.lr=1e-3",
             *FAST, f"trainer.max_epochs={EPOCHS}", "data.batch_size=4",
             "logger.flush_every_s=0", "hydra.sweep.dir=sweep"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        first = job_process(sweeper)
        while not list((tmp_path / "sweep").glob("*/checkpoints/last.pt")):  # epoch 1 done
            assert sweeper.poll() is None, log.read_text()
            time.sleep(0.1)
        first.send_signal(signal.SIGUSR2)  # what Slurm sends before preempting the job
        first.wait(timeout=120)  # the first attempt ends; submitit starts the next
        assert sweeper.wait(timeout=600) == 0, log.read_text()
    finally:
        if sweeper.poll() is None:
            sweeper.kill()
    logs = "".join(p.read_text() for p in (tmp_path / "sweep").glob(".submitit/*/*_log.*"))
    assert "this job is preempted" in logs and "Requeued job" in logs, logs
    runs = runs_of(mlflow_client)
    parent, *jobs = sorted(runs, key=lambda r: r.data.tags.get("trainlab.role") != "sweep")
    (job,) = jobs  # one MLflow run for the job, through both attempts
    assert parent.info.status == job.info.status == "FINISHED"
    assert job.data.tags["trainlab.resumed_from"].endswith("checkpoints/last.pt")
    run_id = job.info.run_id
    epochs = [(m.step, m.value) for m in mlflow_client.get_metric_history(run_id, "epoch")]
    assert sorted(value for _, value in epochs) == list(range(EPOCHS))
    for key in ("train/loss", "train/loss_epoch", "val/acc"):
        steps = [m.step for m in mlflow_client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step"
    losses = [m.step for m in mlflow_client.get_metric_history(run_id, "train/loss")]
    assert max(losses) == max(step for step, _ in epochs)  # every step to the end
    assert len(losses) == max(losses) // 10  # one per log_every_n_steps, none missing
