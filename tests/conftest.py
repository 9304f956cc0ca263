"""Shared helpers: a private MLflow store per test, the real `trainlab` command (as a process or
in this one), Hydra compose, a free port, a tracker that records, the fast settings."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

# `make test` runs tests side by side, most of them starting trainlab processes or servers:
# one torch thread per process (this one and every process a test starts) keeps them from
# spinning against each other on a small machine. Set before torch is first imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The `mlflow server`s tests start serve runs only: no background job runner process.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

# imgaug needs trainlab's NumPy-2 repairs before it is imported anywhere in a test process,
# including pytest-xdist's controller, which imports the module of each warning it reports.
import trainlab.data.imgaug_compat  # noqa: F401
from trainlab.tracker import NullTracker

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "conf"
TRAINLAB = Path(sys.executable).with_name("trainlab")

# Tiny, fast settings for end-to-end runs where the learning itself is not under test.
QUICK = ["model=mlp", "trainer.max_epochs=2", "trainer.progress_bar=false"]
# The same without a fixed length and without logging the MLflow model (seconds per run).
FAST = ["model=mlp", "trainer.progress_bar=false", "logger.log_model=none"]


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RecordingTracker(NullTracker):
    """A tracker that keeps the metrics and artifacts it is given, for tests that read back
    what a run logged without an MLflow store."""

    def __init__(self, log_every_n_steps: int = 1) -> None:
        super().__init__(log_every_n_steps)
        self.metrics: dict[str, list[tuple[int, float]]] = {}  # name → [(step, value)]
        self.artifacts: list[str] = []

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, value))

    def log_metric_series(self, rows):
        for step, metrics in rows:
            self.log_metrics(metrics, step)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(str(path))

    def last(self, name: str) -> float:
        return self.metrics[name][-1][1]


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty sqlite store, made once per test process: MLflow's schema migrations cost
    about a second of CPU for each new store."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path: Path, empty_store: Path, request) -> str:
    """The test's own sqlite store in ``tmp_path``: a copy of an empty store, its default
    experiment's artifacts under ``tmp_path`` as MLflow would place them. Tests marked
    ``no_store`` get no file, so they can assert that MLflow was never reached."""
    store = tmp_path / "mlflow.db"
    if request.node.get_closest_marker("no_store") is None:
        copy_store(empty_store, store, default_artifacts=str(tmp_path / "mlruns" / "0"))
    return f"sqlite:///{store}"


def copy_store(empty_store: Path, store: Path, default_artifacts: str) -> None:
    """``empty_store`` copied to ``store``, its default experiment's artifacts where MLflow
    would have put them had it made ``store`` itself."""
    shutil.copyfile(empty_store, store)
    with closing(sqlite3.connect(store)) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                   (default_artifacts,))


@contextmanager
def stalled_store(db):
    """Hold the sqlite store's write lock, as a busy writer of a shared store would. Taken by
    retrying at once rather than through sqlite's backing-off busy handler, which a run
    writing every step can starve until it has finished."""
    lock = sqlite3.connect(db, isolation_level=None, timeout=0)
    deadline = time.monotonic() + 30
    while True:
        try:
            lock.execute("BEGIN EXCLUSIVE")
            break
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)
    try:
        yield
    finally:
        lock.execute("ROLLBACK")
        lock.close()


@pytest.fixture
def run_trainlab(tmp_path: Path, tracking_uri: str):
    """Run the installed `trainlab` command in ``tmp_path`` (or ``cwd``) against the test's
    own store."""

    def run(*args: str, timeout: float = 300, env: dict | None = None, check: bool = True,
            cwd: Path | None = None):
        full_env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, **(env or {})}
        proc = subprocess.run(
            [str(TRAINLAB), *args], cwd=cwd or tmp_path, env=full_env,
            capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"trainlab {' '.join(args)} exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
            )
        return proc

    return run


@dataclass
class Outcome:
    """What a `trainlab` call run in-process ended with (named like subprocess's result)."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def trainlab_in_process(tmp_path: Path, tracking_uri: str, monkeypatch, capsys):
    """``run_trainlab`` without a new interpreter: `trainlab ARGS` called in this process, in
    ``tmp_path``, against the test's own store.

    The same code path as the command (cli.main → Hydra app), without starting Python and
    importing torch and mlflow again: seconds saved per call. Tests of signals, of the
    installed executable or of DDP keep using ``run_trainlab``.
    """
    import mlflow

    from trainlab.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)

    def run(*args: str, check: bool = True) -> Outcome:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        outcome = Outcome(int(code or 0), captured.out, captured.err)
        if check and outcome.returncode != 0:
            raise AssertionError(f"trainlab {' '.join(args)} exited {outcome.returncode}\n"
                                 f"--- stdout\n{outcome.stdout[-4000:]}\n"
                                 f"--- stderr\n{outcome.stderr[-4000:]}")
        return outcome

    yield run
    mlflow.set_tracking_uri(None)


# Loads a logged model with mlflow.pytorch in a fresh interpreter where the packages named
# in argv[4:] cannot be imported, and checks its weights are the run's best.pt.
LOAD_ELSEWHERE = """
import importlib.util, sys
from pathlib import Path
hidden = sys.argv[4:]
sys.path[:] = [p for p in sys.path if not any((Path(p or ".") / name).exists() for name in hidden)]
assert all(importlib.util.find_spec(name) is None for name in hidden), hidden
import mlflow, mlflow.pytorch, torch
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pytorch.load_model(f"runs:/{sys.argv[2]}/model")
best = torch.load(sys.argv[3], weights_only=True)["model"]
same = all(torch.equal(value, best[key]) for key, value in model.state_dict().items())
print(type(model).__module__, type(model).__name__, same, model.eval().training)
"""


def load_model_elsewhere(tracking_uri: str, run_id: str, best: Path, cwd: Path,
                         hidden: tuple[str, ...] = ("trainlab",)) -> list[str]:
    """``mlflow.pytorch.load_model`` of a run's model in a new Python started in ``cwd``,
    with ``hidden`` packages off its path: (class module, class name, whether the weights
    equal ``best``'s, whether ``.eval()`` left it training)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, tracking_uri, run_id,
                           str(best), *hidden], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()[-4:]


@pytest.fixture
def mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def runs_of(client, experiment: str = "trainlab"):
    """All runs of ``experiment``, oldest first."""
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return sorted(client.search_runs([found.experiment_id]), key=lambda r: r.info.start_time)


@pytest.fixture
def compose():
    """Compose the real config with overrides, as `trainlab train` would (hydra keys included)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose("train", overrides=list(overrides))

    return _compose


@pytest.fixture(autouse=True)
def same_random_state_for_every_test():
    """Every test starts from one random state, as a run starts from its seed: what a test
    sees does not depend on which tests ran before it in the same process."""
    from trainlab.seeding import seed_everything

    seed_everything(0)


def pytest_collection_modifyitems(items):
    """Slow tests first: spread over test processes (`make test`), the long ones then start
    early and the short ones fill the end, instead of one long test running on alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
