"""Is a RUNNING MLflow run's process still there?

A run's status says RUNNING until its process closes it; a process that dies hard (SIGKILL,
the OOM killer, a lost node) never does. So a run records where it runs when it opens (host,
pid and the process's start time, which tells a reused pid apart) and its sender thread
refreshes a heartbeat tag while the process lives. On the run's host the pid answers; from
elsewhere, a heartbeat older than ``stale_after_s`` does. `trainlab runs --cleanup` marks the
runs found dead KILLED, and resuming one continues it, while a live one is refused.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

HOST_TAG = "trainlab.host"
PID_TAG = "trainlab.pid"
PROCESS_START_TAG = "trainlab.pid_started"  # the process's start time, seconds since 1970
HEARTBEAT_TAG = "trainlab.heartbeat"  # seconds since 1970, refreshed while the process lives
KILLED_BY_TAG = "trainlab.killed_by"
HEARTBEAT_EVERY_S = 60.0
STALE_AFTER_S = 10 * 60.0  # a heartbeat this old (server outages included) means dead


def process_tags() -> dict[str, str]:
    """The tags a run gets when this process opens (or reopens) it."""
    import psutil

    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            PROCESS_START_TAG: f"{psutil.Process().create_time():.2f}", **heartbeat_tag()}


def heartbeat_tag() -> dict[str, str]:
    return {HEARTBEAT_TAG: str(int(time.time()))}


@dataclass
class Verdict:
    alive: bool
    reason: str  # "pid 123 on node1 is running", "its process (pid 123 on node1) is gone"
    last_seen: float  # seconds since 1970: the run's last heartbeat (or its start)


def judge(run: Any, stale_after_s: float = STALE_AFTER_S) -> Verdict:
    """Whether the process of a RUNNING ``run`` (an MLflow ``Run``) is alive."""
    tags = run.data.tags
    host, pid = tags.get(HOST_TAG), tags.get(PID_TAG)
    last_seen = float(tags.get(HEARTBEAT_TAG) or run.info.start_time / 1000)
    if host == socket.gethostname() and pid:
        if _same_process(int(pid), tags.get(PROCESS_START_TAG)):
            return Verdict(True, f"pid {pid} on {host} is running", last_seen)
        return Verdict(False, f"its process (pid {pid} on {host}) is gone", last_seen)
    age = time.time() - last_seen
    where = f"from {host}" if host else "(no host recorded)"
    if age > stale_after_s:
        return Verdict(False, f"no heartbeat {where} for {_span(age)}", last_seen)
    return Verdict(True, f"heartbeat {where} {_span(age)} ago", last_seen)


def _same_process(pid: int, started: str | None) -> bool:
    """``pid`` is running and is the process that opened the run (not a reused pid, and not
    this process: a run an earlier job of this process left open)."""
    import psutil

    if pid == os.getpid():
        return False
    try:
        created = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return started is None or abs(created - float(started)) < 1.0


def cleanup(client: Any, experiment_ids: list[str], stale_after_s: float = STALE_AFTER_S
            ) -> list[str]:
    """Mark the RUNNING runs whose process is gone KILLED (ended at their last heartbeat);
    one line per RUNNING run says what was done and why. A run without process tags that
    has child runs (a sweep's parent) is judged by them: dead when none runs and the last
    one stopped ``stale_after_s`` ago. Jobs go first, so their parent sees them settled."""
    running = client.search_runs(experiment_ids, "attributes.status = 'RUNNING'",
                                 max_results=50000)
    running.sort(key=lambda run: PID_TAG not in run.data.tags)
    return [_settle(client, run, _judge_any(client, run, stale_after_s)) for run in running]


def _judge_any(client: Any, run: Any, stale_after_s: float) -> Verdict:
    if PID_TAG in run.data.tags:
        return judge(run, stale_after_s)
    children = client.search_runs([run.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
                                  max_results=50000)
    if not children:
        return judge(run, stale_after_s)
    if any(child.info.status == "RUNNING" for child in children):
        return Verdict(True, "one of its child runs is running", time.time())
    last_seen = max((child.info.end_time or child.info.start_time) / 1000
                    for child in children)
    age = time.time() - last_seen
    if age > stale_after_s:
        return Verdict(False, f"none of its child runs has run for {_span(age)}", last_seen)
    return Verdict(True, f"its last child run ended {_span(age)} ago", last_seen)


def _span(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _settle(client: Any, run: Any, verdict: Verdict) -> str:
    name = f"{run.info.run_id} ({run.info.run_name})"
    if verdict.alive:
        return f"still running: {name}: {verdict.reason}"
    client.set_tag(run.info.run_id, KILLED_BY_TAG, f"trainlab runs --cleanup: {verdict.reason}")
    client.set_terminated(run.info.run_id, "KILLED", end_time=int(verdict.last_seen * 1000))
    line = f"KILLED {name}: {verdict.reason}"
    folder = run.data.tags.get("trainlab.output_dir")
    if folder and os.path.isfile(os.path.join(folder, "checkpoints", "last.pt")):
        line += f"; continue it with trainer.resume={folder}/checkpoints/last.pt"
    return line
