"""A cache of decoded samples (``data.cache``), so epochs after the first skip decoding.

Decoding and resizing a JPEG costs milliseconds; reading the finished array back costs
microseconds. The cache holds each sample's arrays after decoding and resizing, before
augmentation, keyed by each file's path, size and modification time: a file that changes
is decoded again.

- ``memory``: one slot per sample in shared memory, filled by whichever DataLoader worker
  decodes the sample first and read by every worker after that; gone when the run ends.
- ``disk``: one file per sample under ``data.cache_dir``, kept across runs and sweep jobs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from trainlab.errors import TrainlabError

log = logging.getLogger(__name__)

MODES = ("memory", "disk")
Decode = Callable[[], tuple[np.ndarray, ...]]


def file_stamps(paths: Sequence[Path]) -> list[int]:
    """(size, mtime in ns) of every file: what says a cached sample is still current."""
    stamps = []
    for path in paths:
        stat = os.stat(path)
        stamps += [stat.st_size, stat.st_mtime_ns]
    return stamps


class NoCache:
    """``data.cache: null``: decode every time."""

    def fetch(self, index: int, paths: Sequence[Path], decode: Decode) -> tuple[np.ndarray, ...]:
        return decode()


class MemoryCache:
    """Samples in shared-memory tensors, one slot per sample, visible to every worker.

    Every sample of a split decodes to the same shapes (``shapes``: one (shape, dtype) per
    array), so the slots are allocated once, before the DataLoader starts its workers.
    """

    def __init__(self, count: int, shapes: Sequence[tuple[tuple[int, ...], np.dtype]],
                 files_per_sample: int = 1) -> None:
        needed = sum(count * int(np.prod(shape)) * np.dtype(dtype).itemsize
                     for shape, dtype in shapes)
        _check_shared_memory(needed)
        self.slots = [
            torch.from_numpy(np.zeros((count, *shape), dtype=dtype)).share_memory_()
            for shape, dtype in shapes
        ]
        self.stamps = torch.zeros(count, 2 * files_per_sample, dtype=torch.int64).share_memory_()
        self.filled = torch.zeros(count, dtype=torch.bool).share_memory_()
        log.info("data.cache=memory: %.0f MB of shared memory for %d samples", needed / 2**20,
                 count)

    def fetch(self, index: int, paths: Sequence[Path], decode: Decode) -> tuple[np.ndarray, ...]:
        stamps = file_stamps(paths)
        if bool(self.filled[index]) and self.stamps[index].tolist() == stamps:
            return tuple(slot[index].numpy().copy() for slot in self.slots)
        arrays = decode()
        for slot, array in zip(self.slots, arrays, strict=True):
            slot[index].numpy()[...] = array
        self.stamps[index] = torch.tensor(stamps)
        self.filled[index] = True  # last: another worker never reads a half-written slot
        return arrays


class DiskCache:
    """One file per sample under ``folder``, named by a hash of its files' paths and stamps
    and of ``variant()`` (what decoding produces: size, channels, how mask values map;
    read at each fetch, as the data check may infer the classes after the dataset is made).

    A file holds the raw bytes of the sample's arrays (``shapes`` says how to read them
    back), read straight into new arrays: a fraction of ``np.load``'s cost per sample."""

    FORMAT = "raw-1"  # part of every key: files of another layout are never read

    def __init__(self, folder: str | Path, variant: Callable[[], str],
                 shapes: Sequence[tuple[tuple[int, ...], np.dtype]]) -> None:
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrainlabError(
                f"data.cache_dir={str(folder)!r} cannot be created ({err}); point it at a "
                "writable folder"
            ) from err
        self.variant = variant
        self.shapes = [(tuple(shape), np.dtype(dtype)) for shape, dtype in shapes]
        self._resolved: dict[tuple[Path, ...], list[str]] = {}  # a run's paths do not move

    def path_of(self, paths: Sequence[Path]) -> Path:
        files = self._resolved.get(tuple(paths))
        if files is None:
            files = self._resolved[tuple(paths)] = [str(Path(p).resolve()) for p in paths]
        key = "|".join([self.FORMAT, self.variant(), *files, *map(str, file_stamps(paths))])
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.raw"

    def fetch(self, index: int, paths: Sequence[Path], decode: Decode) -> tuple[np.ndarray, ...]:
        path = self.path_of(paths)
        cached = self._read(path)
        if cached is not None:
            return cached
        arrays = decode()
        path.parent.mkdir(exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with partial.open("wb") as handle:
            for array, (shape, dtype) in zip(arrays, self.shapes, strict=True):
                handle.write(np.ascontiguousarray(array, dtype=dtype).reshape(shape).data)
        os.replace(partial, path)  # atomic: parallel workers and jobs see whole files only
        return arrays

    def _read(self, path: Path) -> tuple[np.ndarray, ...] | None:
        """The cached arrays, or None when the file is missing or not whole."""
        arrays = tuple(np.empty(shape, dtype) for shape, dtype in self.shapes)
        try:
            with path.open("rb") as handle:
                for array in arrays:
                    if handle.readinto(memoryview(array).cast("B")) != array.nbytes:
                        return None
                if handle.read(1):
                    return None
        except OSError:
            return None
        return arrays


def build_cache(mode: str | None, count: int, shapes, variant: Callable[[], str],
                cache_dir: str | None, files_per_sample: int = 1):
    """The cache ``data.cache`` names (null, ``memory`` or ``disk``) for a split of
    ``count`` samples decoding to ``shapes``."""
    if mode in (None, "none", False):
        return NoCache()
    if mode == "memory":
        return MemoryCache(count, shapes, files_per_sample)
    if mode == "disk":
        return DiskCache(cache_dir or default_cache_dir(), variant, shapes)
    raise TrainlabError(f"data.cache={mode!r} is not a cache; choose null, memory or disk")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/trainlab/decoded`` (``~/.cache/trainlab/decoded``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "trainlab" / "decoded"


def _check_shared_memory(needed: int) -> None:
    """A full /dev/shm kills workers with SIGBUS mid-epoch; say so before the first batch."""
    if not Path("/dev/shm").is_dir():
        return
    free = shutil.disk_usage("/dev/shm").free
    if needed > free:
        raise TrainlabError(
            f"data.cache=memory needs {needed / 2**20:,.0f} MB of shared memory but /dev/shm "
            f"has {free / 2**20:,.0f} MB free; use data.cache=disk, a smaller "
            "data.image_size, or give the container more shared memory (--shm-size)"
        )
