"""Runs against a real `mlflow server` that dies and comes back: training never waits on it,
nothing logged is lost or sent twice, and `trainlab sync` delivers what a run spooled."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TRAINLAB, copy_store, runs_of, stalled_store

pytestmark = pytest.mark.slow

MLFLOW = Path(sys.executable).with_name("mlflow")


class Server:
    """An `mlflow server` on a sqlite file and a local artifact folder, restartable on its port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # its workers die with it (killpg)
        )
        import requests

        for _ in range(240):
            try:
                if requests.get(f"{self.uri}/health", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            assert self.proc.poll() is None, "mlflow server exited at start"
            time.sleep(0.5)
        raise AssertionError("mlflow server did not answer within 2 minutes")

    def pause(self, paused: bool = True) -> None:
        """Stop (or continue) the server's processes: connections open, nothing answered."""
        os.killpg(self.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture
def server(tmp_path, empty_store):
    copy_store(empty_store, tmp_path / "server.db", default_artifacts="mlflow-artifacts:/0")
    server = Server(tmp_path)
    server.start()
    yield server
    server.kill()


def start_training(tmp_path: Path, server: Server, *overrides: str,
                   log_model: str = "none") -> subprocess.Popen:
    """`trainlab train` as a user starts it, its output read line by line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [str(TRAINLAB), "train", "model=mlp", "trainer.progress_bar=false",
         f"logger.log_model={log_model}", f"logger.tracking_uri={server.uri}",
         "logger.flush_every_s=0", "logger.retry_every_s=0.5", "hydra.run.dir=out", *overrides],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def read_until(proc: subprocess.Popen, text: str, seen: list[str]) -> None:
    read_until_all(proc, [text], seen)


def read_until_all(proc: subprocess.Popen, texts: list[str], seen: list[str]) -> None:
    """Read until every text has been printed, in any order (a warning from the tracking
    thread may come before or after the epoch lines of a fast run)."""
    waiting = list(texts)
    for line in proc.stdout:
        seen.append(line)
        waiting = [text for text in waiting if text not in line]
        if not waiting:
            return
    raise AssertionError(f"trainlab ended before printing {waiting!r}:\n{''.join(seen)[-3000:]}")


def sync(tmp_path: Path) -> subprocess.CompletedProcess:
    """`trainlab sync out`, as a user types it."""
    return subprocess.run([str(TRAINLAB), "sync", "out"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def assert_every_epoch_once(client, run_id: str, epochs: int) -> None:
    history = client.get_metric_history(run_id, "val/acc")
    assert sorted(m.step for m in history) == sorted({m.step for m in history}), "sent twice"
    assert len(history) == epochs
    epoch_steps = [m.step for m in client.get_metric_history(run_id, "epoch")]
    assert len(epoch_steps) == len(set(epoch_steps)) == epochs


def interrupted_while_down(tmp_path: Path, server: Server, *overrides: str,
                           log_model: str = "none") -> str:
    """A 200-epoch run whose server dies after epoch 1, stopped by Ctrl-C an epoch later:
    it ends in seconds (not after HTTP retries) with exit code 130."""
    proc = start_training(tmp_path, server, "trainer.max_epochs=200", *overrides,
                          log_model=log_model)
    seen: list[str] = []
    read_until(proc, "epoch   1/200", seen)
    server.kill()
    read_until(proc, "does not answer", seen)
    read_until(proc, "epoch ", seen)
    proc.send_signal(signal.SIGINT)
    output = "".join(seen) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, output[-3000:]
    return output


def test_server_killed_mid_run_and_restarted_gets_every_epoch_once(server, tmp_path):
    # epochs to spare after the first: the server must be gone before the model is logged
    proc = start_training(tmp_path, server, "trainer.max_epochs=10",
                          "logger.close_timeout_s=300", "logger.log_checkpoints=true",
                          log_model="best")
    seen: list[str] = []
    read_until(proc, "epoch   1/10", seen)
    server.kill()
    # one warning line, and every epoch trained while the server is down
    read_until_all(proc, ["does not answer", "epoch  10/10"], seen)
    server.start()                              # the run's end waits for it, then sends all
    rest, _ = proc.communicate(timeout=300)
    output = "".join(seen) + rest
    assert proc.returncode == 0, output[-3000:]
    assert output.count("does not answer") == 1
    assert "answers again" in output
    (run,) = runs_of(server.client())
    assert run.info.status == "FINISHED"
    assert_every_epoch_once(server.client(), run.info.run_id, 10)
    assert not (tmp_path / "out" / "mlflow-spool").exists(), "a delivered spool is removed"
    assert "MLflow took the run's model" in output  # owed while down, logged once back
    assert run.data.tags["trainlab.model_epoch"]
    assert len(run.outputs.model_outputs) == 1
    # checkpoints and their MLflow copies follow the umask, not mkstemp's 0600
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    stored = next((tmp_path / "artifacts").rglob("last.pt"))
    for path in (tmp_path / "out" / "checkpoints" / "last.pt", stored):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_sigint_while_the_server_is_down_stops_at_once_and_sync_delivers_later(
    server, tmp_path
):
    output = interrupted_while_down(tmp_path, server, "logger.log_checkpoints=true")
    assert "Traceback" not in output
    assert "trainlab sync" in output
    epochs_done = len(re.findall(r"^epoch +\d+/200", output, re.MULTILINE))
    spool = tmp_path / "out" / "mlflow-spool"
    assert list(spool.glob("*.jsonl"))

    down = sync(tmp_path)
    assert down.returncode == 1 and "does not answer" in down.stderr
    assert list(spool.glob("*.jsonl")), "a failed sync keeps the spool"

    server.start()
    synced = sync(tmp_path)
    assert synced.returncode == 0, synced.stderr
    again = sync(tmp_path)
    assert again.returncode == 0 and again.stdout.startswith("out: nothing to send")
    (run,) = runs_of(server.client())
    assert run.info.status == "KILLED"
    assert_every_epoch_once(server.client(), run.info.run_id, epochs_done)
    artifacts = {a.path for a in server.client().list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/last.pt" in artifacts
    assert not spool.exists()


def test_ctrl_c_while_the_server_hangs_spools_what_is_in_flight_and_sync_sends_it_once(
    server, tmp_path
):
    """A server that takes connections but answers nothing (stopped, or cut off by the
    network): Ctrl-C does not wait out MLflow's timeouts; a call in flight is also spooled,
    and sending it twice once the server is back leaves each epoch once."""
    proc = start_training(tmp_path, server, "trainer.max_epochs=200")
    seen: list[str] = []
    read_until(proc, "epoch   1/200", seen)
    server.pause()
    read_until(proc, "epoch   3/200", seen)
    proc.send_signal(signal.SIGINT)
    output = "".join(seen) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "trainlab sync" in output
    # it left before the call in flight timed out (MLFLOW_HTTP_REQUEST_TIMEOUT, 10 s)
    assert "does not answer" not in output, output[-3000:]
    epochs_done = len(re.findall(r"^epoch +\d+/200", output, re.MULTILINE))

    server.pause(False)
    synced = sync(tmp_path)
    assert synced.returncode == 0, synced.stderr
    (run,) = runs_of(server.client())
    assert run.info.status == "KILLED"
    assert_every_epoch_once(server.client(), run.info.run_id, epochs_done)


def test_resuming_a_run_stopped_while_the_server_was_down_sends_its_spool_first(
    server, tmp_path
):
    """Stopped with calls (and its model) spooled, then resumed once the server is back:
    the run gets every epoch once and one model, and no spool is left for a sync to send
    twice."""
    output = interrupted_while_down(tmp_path, server, log_model="best")
    epochs_done = len(re.findall(r"^epoch +\d+/200", output, re.MULTILINE))
    spool = tmp_path / "out" / "mlflow-spool"
    assert list(spool.glob("*.jsonl"))

    server.start()
    resumed = start_training(tmp_path, server, f"trainer.max_epochs={epochs_done + 2}",
                             "trainer.resume=last", log_model="best")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert not spool.exists()
    client = server.client()
    (run,) = runs_of(client)
    assert run.info.status == "FINISHED"
    assert_every_epoch_once(client, run.info.run_id, epochs_done + 2)
    assert len(run.outputs.model_outputs) == 1
    assert "nothing to send" in sync(tmp_path).stdout


def test_a_model_owed_while_the_server_was_down_is_logged_and_registered_by_sync(
    server, tmp_path
):
    proc = start_training(tmp_path, server, "trainer.max_epochs=8", "logger.close_timeout_s=1",
                          "logger.register_model=digits_mlp", log_model="best")
    seen: list[str] = []
    read_until(proc, "epoch   1/8", seen)
    server.kill()  # down until the run has ended (epochs to spare before the model is logged)
    rest, _ = proc.communicate(timeout=300)
    output = "".join(seen) + rest
    assert proc.returncode == 0, output[-3000:]
    assert "the run's model waits for MLflow" in output and "trainlab sync" in output
    spool = tmp_path / "out" / "mlflow-spool"
    assert (spool / "model.json").is_file()

    server.start()
    before_sync_ms = time.time() * 1000
    synced = sync(tmp_path)
    assert synced.returncode == 0, synced.stderr
    assert "logged the run's model" in synced.stdout
    assert not spool.exists()
    client = server.client()
    (run,) = runs_of(client)
    assert run.info.status == "FINISHED"
    assert run.info.end_time < before_sync_ms, "the end time is the run's, not the sync's"
    assert_every_epoch_once(client, run.info.run_id, 8)

    import mlflow.pytorch
    import torch
    from omegaconf import OmegaConf

    from trainlab.checkpoint import load_checkpoint
    from trainlab.inference import load_model

    best = tmp_path / "out" / "checkpoints" / "best.pt"
    assert run.data.tags["trainlab.model_epoch"] == str(load_checkpoint(best)["best_epoch"] + 1)
    (version,) = client.search_model_versions("name='digits_mlp'")
    assert version.run_id == run.info.run_id
    mlflow.set_tracking_uri(server.uri)
    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model", map_location="cpu")
    trained = load_model(OmegaConf.load(tmp_path / "out" / ".hydra" / "config.yaml"), best)
    batch = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(logged.eval()(batch), trained(batch))

    again = sync(tmp_path)
    assert again.returncode == 0 and again.stdout.startswith("out: nothing to send")
    assert len(client.search_model_versions("name='digits_mlp'")) == 1, "registered twice"
    assert len(client.get_run(run.info.run_id).outputs.model_outputs) == 1, "logged twice"


def test_a_server_that_dies_while_the_model_is_logged_leaves_it_owed_not_a_failed_run(
    server, tmp_path, capfd
):
    """The server dies after the run's last call went through: the outbox has not seen it go,
    so the model's own upload is the first call to find out."""
    import numpy as np
    import torch

    from trainlab.tracking import MlflowTracker

    tracker = MlflowTracker(tracking_uri=server.uri, log_system_metrics=False,
                            close_timeout_s=1)
    spool = tmp_path / "out" / "mlflow-spool"
    with tracker.run("dies at the model", {}, spool_dir=spool):
        run_id = tracker.run_id
        server.kill()
        logged = tracker.log_model(torch.nn.Linear(4, 2).eval(),
                                   np.zeros((2, 4), dtype=np.float32))
    assert logged is False
    assert (spool / "model.json").is_file()
    err = capfd.readouterr().err
    assert "stopped answering while the model was logged" in err
    assert f"trainlab sync {spool.parent}" in err
    server.start()
    assert server.client().get_run(run_id).info.status == "RUNNING"  # its end is spooled


def test_three_runs_started_at_once_on_a_new_sqlite_store_all_finish(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    procs = [
        subprocess.Popen(
            [str(TRAINLAB), "train", "model=mlp", "trainer.max_epochs=1", "logger.log_model=none",
             "logger.log_checkpoints=false", "trainer.progress_bar=false", f"seed={seed}"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for seed in range(3)
    ]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
    from mlflow.tracking import MlflowClient

    runs = runs_of(MlflowClient(tracking_uri=uri))
    assert [run.info.status for run in runs] == ["FINISHED"] * 3


@pytest.mark.slow
def test_a_sqlite_store_held_by_another_writer_to_the_end_costs_one_line_and_sync_delivers(
    tmp_path, tracking_uri
):
    """Another process holds a shared sqlite store's write lock from the run's start to its
    end: training finishes, what the store did not take is spooled and said in one line
    (no tracebacks or SQL from MLflow's sqlite layer), and `trainlab sync` delivers it once
    the store is free."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [str(TRAINLAB), "train", "model=mlp", "model.hidden=[16]", "trainer.max_epochs=50",
         "trainer.progress_bar=false", "logger.log_model=none", "logger.flush_every_s=0",
         "hydra.run.dir=out"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    read_until(proc, "MLflow run ", seen)  # 50 epochs: seconds to spare for taking the lock
    with stalled_store(tmp_path / "mlflow.db"):
        output = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "epoch  50/50" in output
    assert re.search(r"MLflow did not take \d+ calls of run \w+; they wait in .*mlflow-spool",
                     output), output[-3000:]
    assert "Traceback" not in output and "[SQL:" not in output, output[-3000:]
    assert sync(tmp_path).returncode == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    (run,) = runs_of(client)
    assert run.info.status == "FINISHED"
    assert_every_epoch_once(client, run.info.run_id, 50)


# The sender thread warns while the loop prints epoch lines (tqdm.write), both into one
# terminal; a line written in two pieces could take the other's text in between.
INTERLEAVED = """
import threading
from tqdm import tqdm
from trainlab.outbox import _say
sender = threading.Thread(target=lambda: [_say(f"warning: {i}") for i in range(2000)])
sender.start()
for i in range(2000):
    tqdm.write(f"epoch {i}")
sender.join()
"""


def test_a_warning_from_the_sender_thread_never_splits_an_epoch_line():
    proc = subprocess.run([sys.executable, "-c", INTERLEAVED], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 4000
    assert [line for line in lines if not re.fullmatch(r"(warning:|epoch) \d+", line)] == []


def test_sync_of_a_run_with_nothing_spooled_says_so_and_refuses_a_folder_of_no_run(
        trainlab_in_process, tmp_path):
    trainlab_in_process("train", "model=mlp", "debug=fast", "trainer.progress_bar=false",
                        "logger.log_system_metrics=false", "hydra.run.dir=out")
    synced = trainlab_in_process("sync", "out")
    assert synced.stdout == "out: nothing to send (no MLflow calls or model wait in its " \
        "mlflow-spool/)\n"
    (tmp_path / "other").mkdir()
    refused = trainlab_in_process("sync", "other", check=False)
    assert refused.returncode == 1
    assert refused.stderr == "error: other has no mlflow-spool/ to send and is no run's " \
        "output folder (no .hydra/): nothing waits there\n"
