"""Shared fixtures: a private MLflow store per test, the real `trainlab` command, Hydra compose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "conf"
TRAINLAB = Path(sys.executable).with_name("trainlab")

# Tiny, fast settings for end-to-end runs where the learning itself is not under test.
QUICK = ["model=mlp", "trainer.max_epochs=2", "trainer.progress_bar=false"]


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def run_trainlab(tmp_path: Path, tracking_uri: str):
    """Run the installed `trainlab` command in ``tmp_path`` against the test's own store."""

    def run(*args: str, timeout: float = 300, env: dict | None = None, check: bool = True):
        full_env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, **(env or {})}
        proc = subprocess.run(
            [str(TRAINLAB), *args], cwd=tmp_path, env=full_env,
            capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"trainlab {' '.join(args)} exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
            )
        return proc

    return run


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


@pytest.fixture
def one_torch_thread():
    """Tiny models in-process: a second torch thread only adds contention on a shared
    2-core machine (tens of times slower under load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
