"""CPU threads: torch's intra-op pool, DDP ranks and DataLoader workers share the cores.

Each loader worker decodes and augments on one core, and a rank's torch pool takes what
is left of its share; oversubscribed cores make every thread wait for the others.
``OMP_NUM_THREADS`` set by the user wins.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def training_threads(num_workers: int, processes: int = 1) -> int:
    """torch threads for one of ``processes`` training processes feeding ``num_workers``
    loader workers each."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, usable_cores() // max(1, processes) - num_workers)


def set_training_threads(device: torch.device, num_workers: int, processes: int = 1) -> None:
    """Size torch's CPU pool for training on ``device`` (GPU runs keep torch's default)."""
    if device.type != "cpu":
        return
    threads = training_threads(num_workers, processes)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        log.debug("torch uses %d CPU threads (%d loader workers, %d processes)",
                  threads, num_workers, processes)


def limit_opencv_threads() -> None:
    """One OpenCV thread (imgaug's back end) in the process about to fork loader workers.

    Workers inherit it, as they get one torch thread from the DataLoader. It is set before
    the fork: resizing OpenCV's pool inside a forked worker can wait forever on a lock a
    pool thread of the parent held at the fork.
    """
    cv2 = sys.modules.get("cv2")  # loaded with imgaug; without it there is nothing to limit
    if cv2 is not None:
        cv2.setNumThreads(1)
