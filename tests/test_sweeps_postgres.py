"""Several sweeping processes (as on several machines) share one Optuna study in PostgreSQL,
one MLflow server whose backend store is PostgreSQL, and one parent run."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import QUICK, TRAINLAB, free_port

pytestmark = pytest.mark.slow


def postgres_bin() -> Path | None:
    """Debian keeps initdb/pg_ctl off PATH, in /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(folders[-1]) if folders else None


def as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: root runs it as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres():
    """A PostgreSQL server of our own in a temp dir on a free port; yields its base URL."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    home = Path(tempfile.mkdtemp(prefix="trainlab-pg-"))  # reachable by the postgres user
    home.chmod(0o777)
    data = home / "data"
    port = free_port()
    subprocess.run(as_postgres_user([str(bindir / "initdb"), "-D", str(data), "-U", "trainlab",
                                     "--auth=trust"]), check=True, capture_output=True)
    subprocess.run(as_postgres_user([
        str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "log"),
        "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start",
    ]), check=True, capture_output=True)
    try:
        for database in ("optuna", "mlflow"):
            subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                            "-U", "trainlab", database], check=True)
        yield f"postgresql+psycopg2://trainlab@127.0.0.1:{port}"
    finally:
        subprocess.run(as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast",
                                         "stop"]), capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """`mlflow server` on the PostgreSQL backend store; yields its URL."""
    port = free_port()
    log = tmp_path / "mlflow-server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"{postgres}/mlflow", "--artifacts-destination", str(tmp_path / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    log.read_text()[-3000:]
                time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_processes_share_one_study_one_server_and_one_parent(postgres, mlflow_server,
                                                             tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    storage = f"{postgres}/optuna"
    command = ["train", "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=random",
               "optimizer.lr=choice(0.001,0.003,0.01,0.03,0.1)", "hydra.sweeper.pruner=null",
               f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=shared",
               "hydra.sweeper.n_trials=4", f"logger.tracking_uri={mlflow_server}",
               *QUICK, "logger.log_model=none"]
    procs = [subprocess.Popen([str(TRAINLAB), *command, f"hydra.sweep.dir=machine{i}",
                               f"seed={i}"], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in (1, 2)]
    for proc in procs:
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]

    study = optuna.load_study(study_name="shared", storage=storage)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 4, [t.state.name for t in study.trials]
    numbers = sorted(int(d.name.split("_")[0]) for d in tmp_path.glob("machine*/[0-9]*_*"))
    assert numbers == sorted(t.number for t in study.trials if not {
        "same_as_trial", "beyond_n_trials"} & t.user_attrs.keys()), \
        "job i runs trial i, whichever machine ran it"

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("trainlab")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("trainlab.role") == "sweep"]
    children = [r for r in runs if r not in [parent]]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert len(children) == len(numbers)
    assert parent.info.status == "FINISHED", "the last process to finish closes the parent"
    best = max(t.value for t in done)
    assert parent.data.metrics["best/val/acc"] == pytest.approx(best)
