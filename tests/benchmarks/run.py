"""trainlab's speed, measured against the loops it replaces; writes tests/benchmarks/RESULTS.md.

Run with `make bench` (10-20 minutes on 2 CPU cores; `--only whole,sweep` runs some
sections and prints them). Whole jobs run as alternating processes (whole_run.py), image
loaders alternate epoch by epoch (image_folder.py), GPU figures need a CUDA GPU (gpu.py).
The training loops below are timed in this one process, interleaved round by round (their
order rotating) so that a busy machine slows them alike; the tables give medians, and each
ratio is the median of the per-round ratios.

- pure compute: one shuffled index per epoch, batches sliced from tensors, no DataLoader,
  nothing measured or logged: the floor any loop can reach.
- course loop: a DataLoader over a TensorDataset and ``loss.item()`` every step.
- trainlab: the Runner composed and built as `trainlab train` builds it, progress bar on,
  logging to MLflow (a temporary sqlite store).
- Lightning: a Trainer with logger, checkpoints and progress bar off (only when the
  optional ``bench`` extra is installed).

torch runs on one thread unless ``--threads N`` says otherwise: on a shared machine a second
OpenMP thread that gets descheduled stalls every op, which swamps the differences measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))  # measure this checkout, whatever is installed

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from trainlab.components import build  # noqa: E402
from trainlab.data.datasets import DataSplits  # noqa: E402
from trainlab.data.loaders import build_loaders  # noqa: E402
from trainlab.metrics import TaskMetrics  # noqa: E402
from trainlab.runner import loop_settings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import gpu_figures  # noqa: E402
from image_folder import image_folder_figures  # noqa: E402
from whole_run import sweep_overhead, whole_jobs  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
BATCH = 64
LOG_EVERY = 10  # logger.log_every_n_steps of conf/logger/mlflow.yaml
DEVICE = torch.device("cpu")


# ------------------------------------------------------------------------ the loops
class Workload:
    """One model on synthetic in-memory data, and a fresh model/optimizer per timed epoch."""

    def __init__(self, name: str, model_option: str, image_size: int, steps: int) -> None:
        self.name, self.steps = name, steps
        generator = torch.Generator().manual_seed(0)
        n = steps * BATCH
        self.x = torch.rand(n, 1, image_size, image_size, generator=generator)
        self.y = torch.randint(0, 10, (n,), generator=generator)
        self.overrides = [f"model={model_option}", f"data.image_size=[{image_size},{image_size}]"]

    def config(self, tracking_uri: str):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return compose("train", [*self.overrides, f"logger.tracking_uri={tracking_uri}"])

    def fresh(self, cfg) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
        """Model, optimizer and loss built by trainlab's builders, as `trainlab train` does."""
        from trainlab.losses import build_loss
        from trainlab.models.finetune import build_model
        from trainlab.optim import build_optimizer

        model = build_model(cfg.model)[0].to(DEVICE)
        return model, build_optimizer(cfg.optimizer, model), build_loss(cfg.loss, None, cfg.data)


def pure_compute(work: Workload, cfg) -> float:
    model, optimizer, loss_fn = work.fresh(cfg)
    model.train()
    started = time.perf_counter()
    order = torch.randperm(len(work.y))
    x, y = work.x[order], work.y[order]
    for start in range(0, len(y), BATCH):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x[start : start + BATCH]), y[start : start + BATCH]).backward()
        optimizer.step()
    return work.steps / (time.perf_counter() - started)


def course_loop(work: Workload, cfg) -> float:
    model, optimizer, loss_fn = work.fresh(cfg)
    loader = DataLoader(TensorDataset(work.x, work.y), batch_size=BATCH, shuffle=True)
    model.train()
    started = time.perf_counter()
    train_loss = 0.0
    for data, label in loader:
        data, label = data.to(DEVICE), label.to(DEVICE)
        optimizer.zero_grad()
        loss = loss_fn(model(data), label)
        loss.backward()
        optimizer.step()
        train_loss += loss.item() * data.size(0)
    return work.steps / (time.perf_counter() - started)


class TrainlabLoop:
    """The Runner of `trainlab train` (same config, same builders), one epoch per call."""

    def __init__(self, work: Workload, cfg, tracker, folder: Path) -> None:
        self.tracker, self.folder = tracker, folder
        val = TensorDataset(work.x[:BATCH], work.y[:BATCH])
        splits = DataSplits(TensorDataset(work.x, work.y), val)
        self.loaders = build_loaders(splits, cfg.data, int(cfg.seed), DEVICE)
        self.epoch = 0

    def __call__(self, work: Workload, cfg) -> float:
        model, optimizer, loss_fn = work.fresh(cfg)
        runner = build(loop_settings(cfg.trainer), "trainer")(
            model=model, loss=loss_fn, optimizer=optimizer, train_loader=self.loaders[0],
            val_loader=self.loaders[1], tracker=self.tracker, checkpoint_dir=self.folder,
            metrics=TaskMetrics(cfg.data.task, cfg.data.num_classes), device=DEVICE,
        )
        self.epoch += 1
        with contextlib.redirect_stderr(io.StringIO()):  # the progress bar stays on, unseen
            started = time.perf_counter()
            runner.train_epoch(self.epoch)
            return work.steps / (time.perf_counter() - started)


def lightning_loop() -> Callable[[Workload, object], float] | None:
    """A Lightning Trainer fitting one epoch, timed from epoch start to end; None without it."""
    try:
        import lightning as L
    except ImportError:
        return None
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")

    class Module(L.LightningModule):
        def __init__(self, model, optimizer, loss_fn) -> None:
            super().__init__()
            self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return self.loss_fn(self.model(inputs), targets)

        def configure_optimizers(self):
            return self.optimizer

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer, module) -> None:
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            self.seconds = time.perf_counter() - self.started

    def run(work: Workload, cfg) -> float:
        timer = EpochTimer()
        trainer = L.Trainer(
            max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=[timer],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        loader = DataLoader(TensorDataset(work.x, work.y), batch_size=BATCH, shuffle=True)
        trainer.fit(Module(*work.fresh(cfg)), train_dataloaders=loader)
        return work.steps / timer.seconds

    return run


def time_loops(work: Workload, loops: dict[str, Callable], cfg, rounds: int) -> dict[str, list]:
    """steps/s of every loop, ``rounds`` times, interleaved with a rotating order."""
    for loop in loops.values():  # warm-up: first-call allocations and lazy imports
        loop(work, cfg)
    names = list(loops)
    speeds: dict[str, list] = {name: [] for name in names}
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            speeds[name].append(loops[name](work, cfg))
    return speeds


def ratio(speeds: dict[str, list], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(speeds[a], speeds[b], strict=True))


# --------------------------------------------------------------------- other figures
def mlflow_costs(tracker) -> list[tuple[str, float]]:
    """Milliseconds per logging call of {train/loss, lr}, and what it adds to each step."""
    import mlflow

    calls = 200
    rows = []

    def timed(log: Callable[[int], None], drain: Callable[[], None]) -> float:
        started = time.perf_counter()
        for step in range(calls):
            log(step)
        drain()
        return (time.perf_counter() - started) / calls * 1e3

    metrics = {"train/loss": 0.5, "lr": 1e-3}
    rows.append(("mlflow.log_metrics, synchronous",
                 timed(lambda s: mlflow.log_metrics(metrics, step=s), lambda: None)))
    rows.append(("mlflow.log_metrics, synchronous=False (drained)",
                 timed(lambda s: mlflow.log_metrics(metrics, step=s, synchronous=False),
                       mlflow.flush_async_logging)))
    rows.append(("trainlab MlflowTracker.log_metrics (queued, one batch)",
                 timed(lambda s: tracker.log_metrics(metrics, step=s), tracker.flush)))
    return rows


def imgaug_throughput(images: int = 512) -> list[tuple[str, str, float]]:
    """Images/s through trainlab's training loader for ``augment=light|strong``: in memory
    with 0 workers (whole batches), or per sample in 2 persistent DataLoader workers."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(images, 1, 28, 28, generator=generator)
    splits = DataSplits(TensorDataset(x, torch.zeros(images, dtype=torch.long)),
                        TensorDataset(x[:BATCH], torch.zeros(BATCH, dtype=torch.long)))
    rows = []
    for option in ("light", "strong"):
        for workers in (0, 2):
            with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                cfg = compose("train", [f"augment={option}", f"data.num_workers={workers}",
                                        f"data.persistent_workers={workers > 0}"])
            augmentation = build(cfg.augment, "augment", option)
            loader, _ = build_loaders(splits, cfg.data, int(cfg.seed), DEVICE, augmentation)
            for _ in loader:  # warm-up epoch: starts the workers
                pass
            started = time.perf_counter()
            for _ in loader:
                pass
            how = "in memory, whole batches" if workers == 0 else "2 workers, per sample"
            rows.append((option, how, images / (time.perf_counter() - started)))
    return rows


def startup_seconds(repeats: int = 3) -> list[tuple[str, float]]:
    """Wall time of the `trainlab` commands that must not load torch or mlflow."""
    trainlab = Path(sys.executable).with_name("trainlab")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    rows = []
    for args in (["--help"], ["train", "--cfg", "job"]):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([str(trainlab), *args], env=env, capture_output=True, check=True)
            times.append(time.perf_counter() - started)
        rows.append(("trainlab " + " ".join(args), statistics.median(times)))
    return rows


# ------------------------------------------------------------------------- report
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} on {threads} thread(s)"


def speed_table(work: Workload, speeds: dict[str, list]) -> str:
    lines = [f"| {work.name} loop | steps/s (median) | range |", "| --- | ---: | ---: |"]
    for name, values in speeds.items():
        lines.append(f"| {name} | {statistics.median(values):,.0f} | "
                     f"{min(values):,.0f}–{max(values):,.0f} |")
    pairs = [("trainlab", "pure compute"), ("trainlab", "course loop"), ("trainlab", "Lightning")]
    lines += ["", "| ratio (median of per-round ratios) | value |", "| --- | ---: |"]
    for a, b in pairs:
        if b in speeds:
            lines.append(f"| {a} / {b} | {ratio(speeds, a, b):.2f}× |")
    return "\n".join(lines) + "\n"


def loop_sections() -> list[str]:
    """Training loops interleaved in this process, and MLflow's cost per logging call."""
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        mlp = Workload("MLP, 64 features", "mlp", 8, steps=100)
        cnn = Workload("course CNN, 28×28", "cnn", 28, steps=10)
        tracker = build(mlp.config(uri).logger, "logger")
        lightning = lightning_loop()
        with tracker.run("benchmark", {}):
            per_step_overhead = None
            for work, rounds in ((mlp, 21), (cnn, 7)):
                cfg = work.config(uri)
                loops = {"pure compute": pure_compute, "course loop": course_loop,
                         "trainlab": TrainlabLoop(work, cfg, tracker, tmp_path / work.name)}
                if lightning is not None and work is mlp:
                    loops["Lightning"] = lightning
                print(f"timing {work.name}: {', '.join(loops)} × {rounds} rounds", flush=True)
                speeds = time_loops(work, loops, cfg, rounds)
                sections.append(f"### {work.name}, batch {BATCH}, Adam, "
                                f"{work.steps} steps per epoch\n\n{speed_table(work, speeds)}")
                if work is mlp:  # seconds per step trainlab adds, from the ratio in the table
                    per_step_overhead = ((1 / ratio(speeds, "trainlab", "pure compute") - 1)
                                         / statistics.median(speeds["pure compute"]))
                else:
                    cnn_step = 1 / statistics.median(speeds["pure compute"])
                    share = (f"{per_step_overhead / cnn_step:.2%}" if per_step_overhead > 0
                             else "below the measurement noise")
                    sections[-1] += (
                        f"\ntrainlab's own work per step, measured on the MLP "
                        f"({per_step_overhead * 1e6:,.0f} µs), is {share} of a CNN step here "
                        f"({cnn_step * 1e3:,.0f} ms).\n"
                    )
            if lightning is None:
                sections.append("Lightning is not installed (`pip install -e .[bench]`): "
                                "its column is skipped.\n")
            print("timing MLflow logging", flush=True)
            rows = mlflow_costs(tracker)
        lines = [f"### MLflow logging ({{train/loss, lr}} every {LOG_EVERY} steps, sqlite)\n",
                 "| call | ms per call | µs per training step |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {ms:.3f} | {ms * 1e3 / LOG_EVERY:,.1f} |" for name, ms in rows]
        sections.append("\n".join(lines) + "\n")
    return sections


def imgaug_section() -> str:
    rows = imgaug_throughput()
    lines = ["### imgaug throughput of the training loader, 28×28 grayscale\n",
             "| augment | how | images/s |", "| --- | --- | ---: |"]
    lines += [f"| {name} | {how} | {speed:,.0f} |" for name, how, speed in rows]
    return "\n".join(lines) + "\n"


def startup_section() -> str:
    lines = ["### Start-up (no torch, no mlflow imported)\n", "| command | seconds (median of 3) |",
             "| --- | ---: |"]
    lines += [f"| `{cmd}` | {seconds:.2f} |" for cmd, seconds in startup_seconds()]
    return "\n".join(lines) + "\n"


SECTIONS = {
    "whole": ("whole jobs as processes", lambda: [whole_jobs()]),
    "sweep": ("sweep overhead per job", lambda: [sweep_overhead()]),
    "loops": ("training loops in one process", loop_sections),
    "images": ("image files and the decoded-image cache", lambda: [image_folder_figures()]),
    "imgaug": ("imgaug pipelines", lambda: [imgaug_section()]),
    "startup": ("start-up", lambda: [startup_section()]),
    "gpu": ("GPU", lambda: [gpu_figures()]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections of {', '.join(SECTIONS)}; a partial "
                             "run prints its figures and leaves RESULTS.md as it is")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    sections = []
    for name in chosen:
        print(f"timing {SECTIONS[name][0]}", flush=True)
        sections += SECTIONS[name][1]()
    header = (
        "# trainlab benchmarks\n\n"
        f"Written by `make bench` on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"in {time.perf_counter() - began:.0f} s.\n\n"
        f"Machine: {machine()}, Python {platform.python_version()}; load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other work on the machine "
        "slows every job alike but widens the ranges; every ratio compares runs measured "
        "alternately in the same benchmark).\n"
    )
    report = "\n".join([header, *sections])
    if set(chosen) == set(SECTIONS):
        RESULTS.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
