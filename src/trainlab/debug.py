"""The ``debug=`` presets: fewer batches (``fast``), the same few batches over and over
(``overfit``: a model and loss that work drive the loss to ~0), and a torch.profiler trace
with a table of the slowest operations (``profile``), logged as the run's artifacts.

Settings live under ``debug.`` (``train_batches``, ``val_batches``, ``overfit_batches``,
``profile``); null means "as usual".
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROFILE_ROWS = 30


class FirstBatches:
    """The first ``n`` batches of ``loader`` in every epoch (the rest of it as it is)."""

    def __init__(self, loader: Any, n: int) -> None:
        self.loader, self.n = loader, int(n)

    def __len__(self) -> int:
        return min(self.n, len(self.loader))

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.loader), self.n)

    def __getattr__(self, name: str) -> Any:  # sampler, set_epoch, dataset, ...
        return getattr(self.loader, name)


class SameBatches:
    """The same batches every epoch, for training and validation alike."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        return iter(self.batches)


def limit_loaders(train_loader: Any, val_loader: Any, debug: Mapping[str, Any] | None):
    """The loaders a ``debug`` config asks for (unchanged without one)."""
    debug = debug or {}
    if debug.get("overfit_batches"):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(0)
        same = SameBatches(list(itertools.islice(train_loader, int(debug["overfit_batches"]))))
        log.info("debug: overfitting %d training batches (also the validation data)", len(same))
        return same, same
    if debug.get("train_batches"):
        train_loader = FirstBatches(train_loader, debug["train_batches"])
    if debug.get("val_batches"):
        val_loader = FirstBatches(val_loader, debug["val_batches"])
    return train_loader, val_loader


@contextlib.contextmanager
def profiled(enabled: bool, output_dir: Path, tracker: Any) -> Iterator[None]:
    """Run the body under torch.profiler when ``enabled``; log its Chrome trace
    (``profile/trace.json``, open in chrome://tracing or Perfetto) and the slowest ops
    (``profile/ops.txt``) to the run."""
    if not enabled:
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    folder = Path(output_dir) / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, record_shapes=True) as profiler:
        yield
    sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=PROFILE_ROWS)
    (folder / "ops.txt").write_text(table + "\n")
    profiler.export_chrome_trace(str(folder / "trace.json"))
    log.info("debug: profile written to %s\n%s", folder, table)
    tracker.log_artifacts(folder, "profile")
