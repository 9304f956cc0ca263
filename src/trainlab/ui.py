"""`trainlab ui`: the MLflow UI on the configured store, opened on the experiment's run table.

The URL is printed only once the server answers (MLflow takes many seconds to start), a
port already in use is refused instead of silently reaching another server, and Ctrl-C
or SIGTERM stops the server with every worker process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from trainlab.errors import TrainlabError

START_TIMEOUT_S = 180  # the first start on a new store runs its migrations


def run_table_page(experiment_id: str) -> str:
    """The UI's model-training run table; its default landing page is a GenAI view."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def check_port_free(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise TrainlabError(f"--port {port}: not a port; choose one from 1 to 65535")
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise TrainlabError(
                f"--port {port}: {host}:{port} is in use ({err.strerror}); another server "
                "runs there. Stop it or choose another --port"
            ) from None


def wait_until_answering(server: subprocess.Popen, base_url: str) -> None:
    """Poll the server's health page until it answers; fail if the server exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise TrainlabError(f"the MLflow server exited with code {server.returncode} "
                                "before it answered (its messages are above)")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TrainlabError(f"the MLflow server did not answer on {base_url} within "
                        f"{START_TIMEOUT_S} s")


def stop(server: subprocess.Popen) -> None:
    """Stop the server's whole process group (uvicorn and its workers), politely first."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)  # whatever did not stop in time
    server.wait()


def ui_cli(args: list[str]) -> int:
    """`trainlab ui`: serve the MLflow UI on the configured store until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="trainlab ui", description=ui_cli.__doc__)
    parser.add_argument("--experiment", help="experiment to open (trainlab, or the store's "
                        "only one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes (one is plenty for a personal UI)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI "
                        "or sqlite:///mlflow.db)")
    opts = parser.parse_args(args)
    import mlflow

    from trainlab.compare import experiment_named
    from trainlab.store import existing_store

    try:
        check_port_free(opts.host, opts.port)
        client = existing_store("--tracking-uri", opts.tracking_uri)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the URL
            experiment = experiment_named(client, opts.experiment)
    except TrainlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    uri = mlflow.get_tracking_uri()
    base_url = f"http://{opts.host}:{opts.port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
         "--host", opts.host, "--port", str(opts.port), "--workers", str(opts.workers)],
        stdout=sys.stderr,  # its messages; stdout carries only the URL
        start_new_session=True,  # its own process group: stopped as a whole
        # a UI to browse runs needs no background job runner (a process fewer to start)
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ},
    )
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        wait_until_answering(server, base_url)
        page = run_table_page(experiment.experiment_id)
        print(f"MLflow UI on {uri}: {base_url}/{page}", flush=True)
        return server.wait()
    except TrainlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop(server)
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt
