"""`trainlab train` end to end: a real subprocess, a real sqlite MLflow store read back."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import QUICK, TRAINLAB, free_port, runs_of
from trainlab.checkpoint import CLASS_NAMES


def test_default_run_learns_digits_and_logs_everything(run_trainlab, mlflow_client, tracking_uri,
                                                       tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q",
                    "--allow-empty", "-m", "x"], cwd=tmp_path, check=True)
    proc = run_trainlab("train")
    assert "epoch  10/10" in proc.stdout
    assert "val loss" in proc.stdout and "acc" in proc.stdout

    (run,) = runs_of(mlflow_client)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "default"
    assert run.data.params["optimizer.lr"] == "0.001"
    assert run.data.params["model"] == "cnn"
    assert run.data.tags["mlflow.source.git.commit"]
    assert run.data.tags["trainlab.output_dir"].startswith(str(tmp_path))
    assert run.data.metrics["val/acc"] >= 0.95

    history = mlflow_client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) >= 20, "train/loss is logged every log_every_n_steps steps"
    assert history[-1].value < history[0].value
    assert len(mlflow_client.get_metric_history(run.info.run_id, "val/acc")) == 10
    assert len(mlflow_client.get_metric_history(run.info.run_id, "lr")) >= 10

    top = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", ".hydra", "checkpoints"} <= top
    # Checkpoints have one home, the run's output folder, which the run names.
    ckpts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "checkpoints")}
    assert ckpts == {f"checkpoints/{CLASS_NAMES}"}
    folder = Path(run.data.tags["trainlab.checkpoints"])
    assert folder.parent == Path(run.data.tags["trainlab.output_dir"])
    assert {"best.pt", "last.pt", CLASS_NAMES} <= {f.name for f in folder.iterdir()}
    hydra_files = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, ".hydra")}
    assert ".hydra/overrides.yaml" in hydra_files

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:200] / 16.0).astype(np.float32)[:, None]
    import torch

    predicted = model(torch.from_numpy(images)).argmax(1).numpy()
    assert (predicted == digits.target[:200]).mean() > 0.9


def test_multirun_makes_one_mlflow_run_per_job(trainlab_in_process, mlflow_client):
    proc = trainlab_in_process("train", "-m", "optimizer.lr=1e-3,1e-2", *QUICK,
                               "logger.log_model=none")
    assert "Launching 2 jobs" in proc.stdout
    runs = [r for r in runs_of(mlflow_client) if "mlflow.parentRunId" in r.data.tags]
    names = [r.info.run_name for r in runs]
    assert "optimizer.lr=0.001" in names[0] and "optimizer.lr=0.01" in names[1]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert [r.data.params["optimizer.lr"] for r in runs] == ["0.001", "0.01"]


def test_exception_marks_the_run_failed_and_keeps_checkpoints(trainlab_in_process, mlflow_client):
    proc = trainlab_in_process("train", *QUICK, "optimizer=sgd", "optimizer.lr=1e10",
                        check=False)
    assert proc.returncode == 1
    assert "loss became nan" in proc.stderr or "loss became inf" in proc.stderr
    (run,) = runs_of(mlflow_client)
    assert run.info.status == "FAILED"


def test_ctrl_c_marks_the_run_killed(tmp_path, tracking_uri, mlflow_client):
    import os

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.Popen(
        [str(TRAINLAB), "train", "trainer.max_epochs=500", "trainer.progress_bar=false"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    for line in proc.stdout:
        if line.startswith("epoch   1/500"):
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    (run,) = runs_of(mlflow_client)
    assert run.info.status == "KILLED"
    assert (Path(run.data.tags["trainlab.checkpoints"]) / "last.pt").is_file()


@pytest.mark.parametrize("sweep", [[], ["-m", "optimizer.lr=1e-3,1e-2"]], ids=["run", "sweep"])
def test_unreachable_tracking_server_fails_fast_before_training(trainlab_in_process, sweep):
    started = time.monotonic()
    proc = trainlab_in_process("train", *sweep, *QUICK, "logger.tracking_uri=http://127.0.0.1:9",
                               check=False)
    assert time.monotonic() - started < 30
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: MLflow tracking server http://127.0.0.1:9 is "
                                  "unreachable"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "epoch" not in proc.stdout


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free loopback port with its own sqlite backend."""
    import sys
    import urllib.request
    from pathlib import Path

    port = free_port()
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}",
         "--artifacts-destination", str(server_dir / "artifacts")],
        cwd=server_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("mlflow server did not come up")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_logs_to_a_remote_mlflow_server(run_trainlab, mlflow_server):
    from mlflow.tracking import MlflowClient

    run_trainlab("train", *QUICK, f"logger.tracking_uri={mlflow_server}",
                 "logger.experiment_name=remote", "logger.log_checkpoints=true")
    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = runs_of(client, "remote")
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2
    ckpts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/best.pt" in ckpts
