"""MLflow calls of one run, sent in order by a background thread, and a spool on disk while
the tracking server does not answer (`trainlab sync OUTPUT_DIR`, in ``trainlab.sync``,
delivers what a run left there).

Training never waits on the server: the loop hands calls to an :class:`Outbox` and goes on.
HTTP calls get short timeouts and no retries of MLflow's own (``bounded_http_calls``); the
outbox retries instead, and while the server is down it appends every call to
``OUTPUT_DIR/mlflow-spool/*.jsonl``. Every call is safe to repeat (the store keeps one copy
of an identical metric, params and tags are set to the same value, artifacts overwrite),
so a call whose answer was lost can be sent again without duplicating anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

SPOOL_DIR = "mlflow-spool"
RUN_FILE = "run.json"
OWED_MODEL = "model.json"  # the run's model is still to be logged, in this format
OWED_EXAMPLE = "model_input_example.npy"  # ... with this input example
METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
PARAMS_PER_BATCH = 100
# MLflow retries an HTTP call for minutes by default; trainlab retries on its own terms.
HTTP_TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT"
HTTP_DEFAULTS = {HTTP_TIMEOUT: "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


def bounded_http_calls() -> None:
    """Short timeouts and no retry loops for MLflow's HTTP calls (a user's own values win)."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def short_http_calls(when: bool) -> Iterator[None]:
    """Inside, MLflow's HTTP calls wait one second (``when`` the store just did not answer:
    a last courtesy call must not hold the process for another full timeout)."""
    if not when:
        yield
        return
    before = os.environ.get(HTTP_TIMEOUT)
    os.environ[HTTP_TIMEOUT] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(HTTP_TIMEOUT, None)
        else:
            os.environ[HTTP_TIMEOUT] = before


class ServerUnreachable(Exception):
    """The tracking store did not answer (connection refused, timeout, 5xx)."""


def did_not_answer(err: BaseException) -> bool:
    """Whether ``err`` says the store did not answer (connection refused, timeout, 5xx),
    rather than that it refused the call."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, (requests.RequestException, ConnectionError, TimeoutError)):
        return True
    return isinstance(err, MlflowException) and err.get_http_status_code() >= 500


def send(client: Any, run_id: str, call: dict[str, Any]) -> None:
    """Make one recorded call against ``run_id``; ``ServerUnreachable`` when the store is down."""
    from mlflow.entities import Metric, Param, RunTag

    kind = call["call"]
    try:
        if kind == "metrics":
            metrics = [Metric(*row) for row in call["rows"]]
            for start in range(0, len(metrics), METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=metrics[start : start + METRICS_PER_BATCH])
        elif kind == "params":
            params = [Param(k, v) for k, v in call["params"].items()]
            for start in range(0, len(params), PARAMS_PER_BATCH):
                client.log_batch(run_id, params=params[start : start + PARAMS_PER_BATCH])
        elif kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in call["tags"].items()])
        elif kind == "text":
            client.log_text(run_id, call["text"], call["file"])
        elif kind == "artifact":
            if Path(call["path"]).exists():  # a file deleted since is nothing to send
                client.log_artifact(run_id, call["path"], call["artifact_path"])
        elif kind == "artifacts":
            if Path(call["path"]).is_dir():
                client.log_artifacts(run_id, call["path"], call["artifact_path"])
        elif kind == "inputs":  # {"context": train|val, "dataset": mlflow Dataset fields}
            from mlflow.entities import Dataset, DatasetInput, InputTag

            client.log_inputs(run_id, datasets=[
                DatasetInput(Dataset(**item["dataset"]),
                             [InputTag("mlflow.data.context", item["context"])])
                for item in call["inputs"]
            ])
        elif kind == "status":  # the end time is when the run ended, not when this is sent
            client.set_terminated(run_id, call["status"], end_time=call.get("end_time"))
        else:
            raise ValueError(f"unknown MLflow call {kind!r}")
    except Exception as err:
        if did_not_answer(err):
            raise ServerUnreachable(str(err).splitlines()[0]) from err
        raise


class Outbox:
    """Sends one run's calls on a daemon thread, in the order they were made.

    While the store is unreachable the calls wait in memory and in the spool file; the thread
    tries again every ``retry_every_s`` and, once the store answers, sends them and empties
    the spool. ``close`` waits a bounded time and leaves whatever is unsent in the spool.
    """

    def __init__(self, tracking_uri: str, run_id: str, spool_dir: Path | None,
                 retry_every_s: float = 5.0, heartbeat_every_s: float | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)
        self.spool_dir = Path(spool_dir) if spool_dir else None
        self.spool_file: Path | None = None  # this process's spool, made when first needed
        self.retry_every_s = float(retry_every_s)
        self._calls: deque[dict[str, Any]] = deque()
        self._spooled = 0  # calls at the queue's front already written to the spool file
        self._lock = threading.Condition()
        self._closing = False  # no more calls will come
        self._stopped = False  # close gave up: the thread sends nothing more
        self.offline = False
        self.metric_calls_stored = 0  # the "through" count of the last metrics call sent
        # the run's heartbeat tag (trainlab.liveness): refreshed while this process lives
        self.heartbeat_every_s = heartbeat_every_s
        self._beat_at = time.monotonic() + (heartbeat_every_s or 0)
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    def put(self, call: dict[str, Any]) -> None:
        with self._lock:
            self._calls.append(call)
            if self.offline:
                self._spool_new()
            self._lock.notify()

    # ------------------------------------------------------------------ sender thread
    def _send_loop(self) -> None:
        while True:
            with self._lock:
                while not self._calls and not self._closing and not self._beat_due():
                    self._lock.wait(self._beat_wait())
                if self._stopped or (self._closing and not self._calls):
                    return
                call = self._calls[0] if self._calls else None
            if self._beat_due():
                self._beat()
            if call is None:
                continue
            stored = call.get("through", self.metric_calls_stored)
            try:
                send(self.client, self.run_id, call)
            except ServerUnreachable as err:
                self._went_offline(err)
                with self._lock:
                    if not self._stopped:
                        self._lock.wait(self.retry_every_s)  # or until close asks once more
                continue
            except Exception as err:  # a call the store refuses: report it, send the rest
                log.warning("MLflow refused a %s call for run %s: %s", call["call"], self.run_id,
                            str(err).splitlines()[0])
            with self._lock:
                self._calls.popleft()
                self.metric_calls_stored = stored
                self._spooled = max(0, self._spooled - 1)
                if self.offline:
                    self._back_online()
                if not self._calls:
                    self._drop_spool()  # everything in it went through
                self._lock.notify_all()

    def _beat_wait(self) -> float | None:
        """Seconds until the next heartbeat is due (None: no heartbeats, wait for calls)."""
        if not self.heartbeat_every_s:
            return None
        return max(0.0, self._beat_at - time.monotonic())

    def _beat_due(self) -> bool:
        return bool(self.heartbeat_every_s) and time.monotonic() >= self._beat_at

    def _beat(self) -> None:
        """Refresh the heartbeat tag; while the store is down the queued calls' retries say
        enough, and a beat is never spooled (a late one would tell a lie)."""
        from trainlab.liveness import heartbeat_tag

        self._beat_at = time.monotonic() + self.heartbeat_every_s
        if self.offline:
            return
        try:
            send(self.client, self.run_id, {"call": "tags", "tags": heartbeat_tag()})
        except Exception as err:  # the next queued call finds out what is wrong
            log.debug("heartbeat of run %s not sent: %s", self.run_id, err)

    def _went_offline(self, err: Exception) -> None:
        with self._lock:
            if self.offline or self._stopped:  # once closed, close has said what is left
                return
            self.offline = True
            self._spool_new()
        where = f"; spooling to {self.spool_dir}" if self.spool_dir else ""
        _say(f"warning: MLflow at {self.tracking_uri} does not answer ({err}); training goes "
             f"on{where}")

    def _back_online(self) -> None:
        """Called with the lock held after a call went through while offline."""
        self.offline = False
        _say(f"MLflow at {self.tracking_uri} answers again; sending {len(self._calls)} "
             "waiting calls")

    # ------------------------------------------------------------------ spool
    def _spool_new(self) -> None:
        """Append the calls not yet in the spool file (lock held)."""
        if self.spool_dir is None or self._spooled == len(self._calls):
            return
        if self.spool_file is None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            write_run_file(self.spool_dir, self.tracking_uri, self.run_id)
            self.spool_file = self.spool_dir / f"{time.time_ns()}-{os.getpid()}.jsonl"
        with self.spool_file.open("a") as handle:
            for call in list(self._calls)[self._spooled:]:
                handle.write(json.dumps(call) + "\n")
        self._spooled = len(self._calls)

    def _drop_spool(self) -> None:
        if self.spool_file is not None:
            self.spool_file.unlink(missing_ok=True)
            self.spool_file = None
            self._spooled = 0
            remove_if_empty(self.spool_dir)

    # ------------------------------------------------------------------ end
    def close(self, timeout_s: float, wait_offline: bool = True) -> int:
        """Let the thread send what it can within ``timeout_s`` (while the store is down only
        with ``wait_offline``); returns how many calls are left unsent, then kept in the spool
        (or lost without a spool dir)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._closing = True
            self._lock.notify_all()  # a thread waiting to retry tries once more now
            while self._calls and time.monotonic() < deadline:
                if self.offline and not wait_offline:
                    break
                self._lock.wait(min(0.2, max(0.0, deadline - time.monotonic())))
            left = len(self._calls)
            if left:
                self._spool_new()
                self._stopped = True
                self._lock.notify_all()
        if not left:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        return left


# ---------------------------------------------------------------------- spool files
def write_run_file(spool_dir: Path, tracking_uri: str, run_id: str) -> None:
    path = spool_dir / RUN_FILE
    if not path.exists():
        path.write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": run_id}) + "\n")


def spooled_run(spool_dir: Path) -> dict[str, str] | None:
    """The run a spool belongs to (its ``tracking_uri`` and ``run_id``); None: no spool."""
    path = spool_dir / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def owe_model(spool_dir: Path, tracking_uri: str, run_id: str, input_example: Any,
              settings: dict[str, Any]) -> None:
    """Record in the spool that the run's model is still to be logged (with ``settings``:
    its format and registry name), and its input example; `trainlab sync` logs it from the
    run's best checkpoint."""
    import numpy as np

    spool_dir.mkdir(parents=True, exist_ok=True)
    np.save(spool_dir / OWED_EXAMPLE, input_example)
    (spool_dir / OWED_MODEL).write_text(json.dumps(settings) + "\n")
    write_run_file(spool_dir, tracking_uri, run_id)


def owed_model(spool_dir: Path) -> dict[str, Any] | None:
    """The settings (format, registry name) of the model the spool says the run owes."""
    path = spool_dir / OWED_MODEL
    return json.loads(path.read_text()) if path.is_file() else None


def drop_owed_model(spool_dir: Path) -> None:
    (spool_dir / OWED_MODEL).unlink(missing_ok=True)
    (spool_dir / OWED_EXAMPLE).unlink(missing_ok=True)


def remove_if_empty(spool_dir: Path | None) -> None:
    """Remove the spool folder once nothing waits in it: no process's spool file, no model."""
    if (spool_dir is None or any(spool_dir.glob("*.jsonl"))
            or (spool_dir / OWED_MODEL).exists()):
        return
    (spool_dir / RUN_FILE).unlink(missing_ok=True)
    with_contents = spool_dir.exists() and any(spool_dir.iterdir())
    if spool_dir.exists() and not with_contents:
        spool_dir.rmdir()


def spooled_calls(spool_dir: Path) -> tuple[list[Path], list[dict[str, Any]]]:
    """A spool's files and its calls in order (final status last)."""
    files = sorted(spool_dir.glob("*.jsonl"))
    calls = [json.loads(line) for path in files for line in path.read_text().splitlines()
             if line.strip()]
    calls.sort(key=lambda call: call["call"] == "status")  # stable: order kept otherwise
    return files, calls


def _say(message: str) -> None:
    """Through tqdm's write lock, as the loop prints its epoch lines: this thread's messages
    then never land inside one of them, nor across a progress bar."""
    tqdm.write(message, file=sys.stderr)
