"""Runs left RUNNING by a process that died: `trainlab runs --cleanup` marks them KILLED and
leaves live ones alone; a resume continues a dead one and refuses a live one."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import FAST, TRAINLAB, runs_of
from trainlab.liveness import (
    HEARTBEAT_TAG,
    HOST_TAG,
    KILLED_BY_TAG,
    PID_TAG,
    PROCESS_START_TAG,
)


def make_run(client, name, tags, parent=None):
    experiment = client.get_experiment_by_name("trainlab")
    experiment_id = (experiment.experiment_id if experiment
                     else client.create_experiment("trainlab"))
    if parent is not None:
        tags = {**tags, "mlflow.parentRunId": parent}
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def test_cleanup_kills_runs_whose_process_or_heartbeat_is_gone_and_leaves_live_ones(
    trainlab_in_process, mlflow_client, tracking_uri
):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        here = socket.gethostname()
        started = f"{psutil.Process(sleeper.pid).create_time():.2f}"
        now = time.time()
        runs = {
            "alive_here": {HOST_TAG: here, PID_TAG: str(sleeper.pid), PROCESS_START_TAG: started,
                           HEARTBEAT_TAG: f"{now - 3600:.0f}"},  # the pid answers, not the age
            "pid_reused": {HOST_TAG: here, PID_TAG: str(sleeper.pid),
                           PROCESS_START_TAG: f"{float(started) - 500:.2f}"},
            "beating_elsewhere": {HOST_TAG: "node-7", PID_TAG: "4242",
                                  HEARTBEAT_TAG: f"{now - 30:.0f}"},
            "silent_elsewhere": {HOST_TAG: "node-7", PID_TAG: "4242",
                                 HEARTBEAT_TAG: f"{now - 1200:.0f}"},
        }
        ids = {name: make_run(mlflow_client, name, tags) for name, tags in runs.items()}
        sweep = make_run(mlflow_client, "sweep", {"trainlab.role": "sweep"})
        job = make_run(mlflow_client, "job", {}, parent=sweep)
        mlflow_client.set_terminated(job, "FINISHED", end_time=int((now - 1500) * 1000))
        live_sweep = make_run(mlflow_client, "live_sweep", {"trainlab.role": "sweep"})
        make_run(mlflow_client, "live_job", runs["beating_elsewhere"], parent=live_sweep)

        out = trainlab_in_process("runs", "--cleanup", "--tracking-uri", tracking_uri).stdout
    finally:
        sleeper.kill()
        sleeper.wait()
    status = {run.info.run_name: run for run in runs_of(mlflow_client)}
    killed = {name for name, run in status.items() if run.info.status == "KILLED"}
    assert killed == {"pid_reused", "silent_elsewhere", "sweep"}
    assert {n for n, r in status.items() if r.info.status == "RUNNING"} == {
        "alive_here", "beating_elsewhere", "live_sweep", "live_job"}
    lines = out.splitlines()
    assert len(lines) == 7
    assert f"KILLED {ids['pid_reused']} (pid_reused): its process (pid {sleeper.pid} on " \
           f"{here}) is gone" in lines
    assert f"KILLED {ids['silent_elsewhere']} (silent_elsewhere): no heartbeat from node-7 " \
           "for 20 min" in lines
    assert f"still running: {ids['alive_here']} (alive_here): pid {sleeper.pid} on {here} " \
           "is running" in lines
    silent = status["silent_elsewhere"]
    assert silent.info.end_time == int(float(runs["silent_elsewhere"][HEARTBEAT_TAG]) * 1000)
    assert silent.data.tags[KILLED_BY_TAG] == "trainlab runs --cleanup: no heartbeat from " \
                                              "node-7 for 20 min"

    again = trainlab_in_process("runs", "--cleanup", "--stale-after", "0.25",
                                "--tracking-uri", tracking_uri).stdout
    assert re.search(rf"KILLED {ids['beating_elsewhere']} \(beating_elsewhere\): no heartbeat "
                     r"from node-7 for \d+ s", again)  # older than a shorter --stale-after


def test_the_sender_thread_refreshes_the_heartbeat(mlflow_client, tracking_uri):
    from trainlab.outbox import Outbox

    run_id = make_run(mlflow_client, "beating", {HEARTBEAT_TAG: "0"})
    outbox = Outbox(tracking_uri, run_id, None, heartbeat_every_s=0.2)
    time.sleep(1.0)  # no call queued: the idle thread beats on its own
    outbox.close(5)
    beat = float(mlflow_client.get_run(run_id).data.tags[HEARTBEAT_TAG])
    assert time.time() - 10 < beat <= time.time()


def start(tmp_path, tracking_uri, name, *args):
    """`trainlab train` as a process (output in ``tmp_path/name.log``), returned once it has
    finished an epoch; and its output up to then."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(TRAINLAB), "train", *FAST, "trainer.max_epochs=10000", f"hydra.run.dir={name}",
             *args], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    while not re.search(r"epoch +\d+/10000", log.read_text()):
        assert proc.poll() is None, log.read_text()
        time.sleep(0.2)
    return proc, log.read_text()


@pytest.mark.slow
def test_a_killed_run_is_continued_or_cleaned_up_and_a_live_one_is_left_alone(
    run_trainlab, mlflow_client, tmp_path, tracking_uri
):
    dead, _ = start(tmp_path, tracking_uri, "dead")
    live, _ = start(tmp_path, tracking_uri, "live")
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        refused = run_trainlab("train", *FAST, "trainer.max_epochs=10000",
                               "trainer.resume=live/checkpoints/last.pt", check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert f"is still running (pid {live.pid} on {socket.gethostname()} is running)" \
            in refused.stderr

        again, output = start(tmp_path, tracking_uri, "dead", "trainer.resume=last")
        assert "was left RUNNING, its process (pid" in output
        again.send_signal(signal.SIGKILL)
        again.wait()
        (dead_run, live_run) = runs_of(mlflow_client)
        assert dead_run.info.status == live_run.info.status == "RUNNING"

        killed, left = sorted(run_trainlab("runs", "--cleanup").stdout.splitlines())
        assert killed.startswith(f"KILLED {dead_run.info.run_id} (")
        assert f"its process (pid {again.pid} on" in killed
        assert f"trainer.resume={tmp_path / 'dead'}/checkpoints/last.pt" in killed
        assert left.startswith(f"still running: {live_run.info.run_id} (")
        assert mlflow_client.get_run(dead_run.info.run_id).info.status == "KILLED"
        assert mlflow_client.get_run(live_run.info.run_id).info.status == "RUNNING"
    finally:
        live.send_signal(signal.SIGINT)
        live.wait(timeout=120)
    assert live.returncode == 130
    assert mlflow_client.get_run(live_run.info.run_id).info.status == "KILLED"
