"""`trainlab sync OUTPUT_DIR`: deliver what a run spooled while its tracking server was down.

The spooled calls are sent in order, the final status (with the time the run ended) last;
then the model, when the run owed one (``logger.log_model`` asked for it and the server
did not answer at the run's end), is rebuilt from the run's config and best checkpoint and
logged into the run, registered when ``logger.register_model`` was set. Each part leaves
the spool only once the store has it, so a sync cut off half-way can simply be repeated.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from trainlab.errors import TrainlabError
from trainlab.outbox import (
    SPOOL_DIR,
    ServerUnreachable,
    bounded_http_calls,
    drop_owed_model,
    owed_model,
    remove_if_empty,
    send,
    spooled_calls,
    spooled_run,
)

RUN_RECORD = ".hydra"  # what every run's output folder holds: Hydra's record of its config


def sync(output_dir: str | os.PathLike) -> tuple[int, bool] | None:
    """Send the spool a run left in ``output_dir``; returns how many calls were sent and
    whether the run's owed model was logged, or None when nothing waits (a run's spool goes
    once sent, so a second sync finds none)."""
    from mlflow.tracking import MlflowClient

    spool_dir = Path(output_dir) / SPOOL_DIR
    run = spooled_run(spool_dir)
    if run is None:
        if (Path(output_dir) / RUN_RECORD).is_dir():
            return None
        raise TrainlabError(f"{output_dir} has no {SPOOL_DIR}/ to send and is no run's output "
                            f"folder (no {RUN_RECORD}/): nothing waits there")
    client = MlflowClient(run["tracking_uri"])
    sent = _send_calls(spool_dir, client, run)
    logged = owed_model(spool_dir) is not None and log_owed_model(spool_dir, client, run)
    remove_if_empty(spool_dir)
    return sent, logged


def sync_before_resume(spool_dir: Path, run_id: str) -> int:
    """Send what an earlier attempt of ``run_id`` spooled, before the run is reopened: its
    steps then count as logged, and nothing is left to be sent twice by a later sync. A
    model it owed is dropped: the resumed run logs its own when it ends."""
    from mlflow.tracking import MlflowClient

    run = spooled_run(spool_dir)
    if run is None or run["run_id"] != run_id:
        return 0
    sent = _send_calls(spool_dir, MlflowClient(run["tracking_uri"]), run)
    drop_owed_model(spool_dir)
    remove_if_empty(spool_dir)
    return sent


def _send_calls(spool_dir: Path, client, run: dict[str, str]) -> int:
    """The spooled calls, in order; their files go once the store has them all."""
    files, calls = spooled_calls(spool_dir)
    bounded_http_calls()
    try:
        for call in calls:
            send(client, run["run_id"], call)
    except ServerUnreachable as err:
        raise TrainlabError(
            f"MLflow at {run['tracking_uri']} does not answer ({err}); the spool in "
            f"{spool_dir} is kept, try again later"
        ) from None
    for path in files:
        path.unlink()
    return len(calls)


def log_owed_model(spool_dir: Path, client, run: dict[str, str]) -> bool:
    """The model the spool says the run owes, logged as the run would have logged it."""
    import mlflow

    from trainlab import late_model
    from trainlab.tracking import MlflowTracker

    mlflow.set_tracking_uri(run["tracking_uri"])
    tracker = MlflowTracker(tracking_uri=run["tracking_uri"], **owed_model(spool_dir))
    try:
        return late_model.log_owed_model(spool_dir, client, run["run_id"], tracker)
    except TrainlabError as err:
        raise TrainlabError(f"{err}; the spool keeps it, try again later") from None


def sync_cli(args: list[str]) -> int:
    """`trainlab sync OUTPUT_DIR...`."""
    if not args or any(arg.startswith("-") for arg in args):
        print("usage: trainlab sync OUTPUT_DIR [OUTPUT_DIR ...]  (sends the MLflow calls and "
              "the model a run spooled while its tracking server was down)", file=sys.stderr)
        return 2
    failed = 0
    for folder in args:
        try:
            result = sync(folder)
        except TrainlabError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        if result is None:
            print(f"{folder}: nothing to send (no MLflow calls or model wait in its "
                  f"{SPOOL_DIR}/)")
            continue
        sent, logged = result
        print(f"{folder}: sent {sent} spooled MLflow calls"
              + (" and logged the run's model" if logged else ""))
    return 1 if failed else 0
