"""Whole jobs as whole processes: what a user waits for, imports and MLflow included.

Each job runs in its own process against its own sqlite store (created by an untimed
warm-up run, as a user's store already exists). The jobs alternate round by round, their
order rotating, so a busy machine slows them alike; figures are medians, and each ratio is
the median of the per-round ratios.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TRAINLAB = Path(sys.executable).with_name("trainlab")
EPOCHS = 20
SAME_FORMAT = "hand-written loop + MLflow, model in pickle format"
JOB = f"digits, MLP 64-256-10, Adam, batch 64, {EPOCHS} epochs, validation every epoch"


def _env(store: Path) -> dict[str, str]:
    path = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
            "HYDRA_FULL_ERROR": "1"}


def _timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def jobs() -> dict[str, list[str]]:
    """The commands compared; Lightning only when it is installed."""
    found = {
        "hand-written loop + MLflow": [sys.executable, str(HERE / "jobs" / "handwritten.py"),
                                       str(EPOCHS)],
        SAME_FORMAT: [sys.executable, str(HERE / "jobs" / "handwritten.py"), str(EPOCHS),
                      "pickle"],
        "trainlab train": [str(TRAINLAB), "train", "model=mlp", f"trainer.max_epochs={EPOCHS}"],
    }
    try:
        import lightning  # noqa: F401
    except ImportError:
        return found
    found["Lightning + MLFlowLogger"] = [sys.executable, str(HERE / "jobs" / "lightning_job.py"),
                                         str(EPOCHS)]
    return found


def whole_jobs(rounds: int = 5) -> str:
    """Wall seconds of each job, alternating; the markdown section of RESULTS.md."""
    commands = jobs()
    names = list(commands)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: Path(tmp) / f"job{i}" for i, name in enumerate(names)}
        for name in names:  # warm-up: creates the store, fills the OS file cache
            folders[name].mkdir()
            _timed(commands[name], folders[name], _env(folders[name] / "mlflow.db"))
        for index in range(rounds):
            for name in names[index % len(names):] + names[: index % len(names)]:
                env = _env(folders[name] / "mlflow.db")
                seconds[name].append(_timed(commands[name], folders[name], env))
                print(f"  {name}: {seconds[name][-1]:.1f} s", flush=True)
    base = "hand-written loop + MLflow"
    lines = [f"### A whole job as a process ({JOB})\n",
             f"{rounds} alternating rounds, wall seconds.\n",
             "| job | median s | range | ratio to the hand-written loop |",
             "| --- | ---: | ---: | ---: |"]
    for name in names:
        ratio = statistics.median(a / b for a, b in zip(seconds[name], seconds[base],
                                                        strict=True))
        lines.append(f"| {name} | {statistics.median(seconds[name]):.1f} | "
                     f"{min(seconds[name]):.1f}–{max(seconds[name]):.1f} | {ratio:.2f}× |")
    same = statistics.median(a / b for a, b in zip(seconds["trainlab train"],
                                                   seconds[SAME_FORMAT], strict=True))
    lines.append(f"\ntrainlab / the hand-written loop logging its model as trainlab does "
                 f"(pickle): {same:.2f}× the wall time.")
    other = "Lightning + MLFlowLogger"
    if other in seconds:
        ratio = statistics.median(a / b for a, b in zip(seconds["trainlab train"],
                                                        seconds[other], strict=True))
        lines.append(f"trainlab / Lightning: {ratio:.2f}× the wall time.")
    else:
        lines.append("\nLightning is not installed (`pip install -e .[bench]`): skipped.")
    lines.append("The hand-written loop logs its model in MLflow's default format; trainlab in "
                 "its configured `logger.model_format`.")
    return "\n".join(lines) + "\n"


def sweep_overhead(jobs_in_sweep: int = 8, epochs: int = 5, repeats: int = 2) -> str:
    """Seconds a sweep job costs beyond its own training, for jobs in one process.

    The marginal cost of a job is (wall of an N-job grid − wall of a 1-job grid) / (N − 1);
    its training time is read back from MLflow (the span of its per-epoch metrics, scaled
    from N − 1 to N epochs); the difference is the per-job overhead.
    """
    from mlflow.tracking import MlflowClient

    rates = [f"{0.001 * (i + 1):.3f}" for i in range(jobs_in_sweep)]
    base = [str(TRAINLAB), "train", "-m", "model=mlp", f"trainer.max_epochs={epochs}",
            "trainer.progress_bar=false"]
    marginal, training = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store = folder / "mlflow.db"
        env = _env(store)
        _timed([*base, f"optimizer.lr={rates[0]}"], folder, env)  # warm-up, creates the store
        for _ in range(repeats):
            one = _timed([*base, f"optimizer.lr={rates[0]}"], folder, env)
            many = _timed([*base, f"optimizer.lr={','.join(rates)}"], folder, env)
            marginal.append((many - one) / (jobs_in_sweep - 1))
            print(f"  sweep: 1 job {one:.1f} s, {jobs_in_sweep} jobs {many:.1f} s", flush=True)
        client = MlflowClient(f"sqlite:///{store}")
        experiment = client.get_experiment_by_name("trainlab")
        for run in client.search_runs([experiment.experiment_id], max_results=200):
            epochs_logged = client.get_metric_history(run.info.run_id, "epoch")
            if len(epochs_logged) == epochs:
                stamps = sorted(m.timestamp for m in epochs_logged)
                training.append((stamps[-1] - stamps[0]) / 1e3 * epochs / (epochs - 1))
    per_job, train_s = statistics.median(marginal), statistics.median(training)
    return "\n".join([
        f"### Sweep overhead per job ({jobs_in_sweep}-job grid in one process, MLP, "
        f"{epochs} epochs)\n",
        "| figure | seconds |", "| --- | ---: |",
        f"| marginal wall time of one more job (median of {repeats}) | {per_job:.2f} |",
        f"| its training (from its per-epoch metrics in MLflow) | {train_s:.2f} |",
        f"| **overhead per job beyond training** | **{per_job - train_s:.2f}** |",
    ]) + "\n"
