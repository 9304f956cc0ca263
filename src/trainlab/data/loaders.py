"""Batches for the runner: a fast path for in-memory tensors, torch's DataLoader otherwise.

Augmentation touches the training split only. In memory (``num_workers: 0`` and tensor
datasets) imgaug augments each whole batch; otherwise each sample is augmented in the
DataLoader's workers. Every random stream is a function of (run seed, epoch, worker id).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from trainlab.data.datasets import DataSplits
from trainlab.errors import TrainlabError
from trainlab.threads import limit_opencv_threads


def epoch_seed(seed: int, epoch: int, worker: int = 0) -> int:
    """A well-mixed 32-bit seed for one (run seed, epoch, worker) triple."""
    entropy = [abs(int(seed)), int(epoch), int(worker)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class InMemoryLoader:
    """Batches sliced from tensors already in memory (and on the device).

    Per-sample ``__getitem__`` plus collate costs more than the forward pass of a small
    model; shuffling the whole tensor once per epoch and slicing views costs nearly nothing.
    The order is a function of (seed, epoch), like a seeded DataLoader's. An
    ``augmentation`` (see trainlab.data.augment) is applied to each whole batch. As one of
    ``world_size`` DDP ranks it takes every ``world_size``-th sample of that order (as
    torch's DistributedSampler does), so the ranks' batch ``i`` together are the global
    batch ``i``; ``pad`` repeats samples so every rank gets as many batches.
    """

    def __init__(
        self,
        tensors: tuple[torch.Tensor, ...],
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        augmentation=None,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ) -> None:
        self.augmentation = augmentation
        if augmentation is not None:
            device = "cpu"  # imgaug works on host memory; the runner moves each batch
        self.tensors = tuple(t.to(device) for t in tensors)
        self.rank, self.world_size = rank, world_size
        total = len(self.tensors[0])
        self.num_samples = -(-total // world_size) if pad else len(range(rank, total, world_size))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.dataset = TensorDataset(*self.tensors)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.augmentation is not None:
            self.augmentation.seed(epoch_seed(self.seed, epoch))

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        tensors = self.tensors
        total = len(tensors[0])
        order = None
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(total, generator=generator)
        if self.world_size > 1:
            order = torch.arange(total) if order is None else order
            order = order.repeat(-(-self.num_samples * self.world_size // total))
            order = order[: self.num_samples * self.world_size][self.rank :: self.world_size]
        if order is not None:
            tensors = tuple(t[order.to(t.device)] for t in tensors)
        augment = self.augmentation
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = tuple(t[start : start + self.batch_size] for t in tensors)
            yield batch if augment is None else augment(*batch)


class WorkerSeeder:
    """``worker_init_fn``: seeds python, numpy, torch and the worker's copy of the
    augmentation from (run seed, epoch, worker id), so workers and epochs differ and runs
    with the same seed repeat exactly."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = 0

    def __call__(self, worker_id: int) -> None:
        seed_worker(epoch_seed(self.seed, self.epoch, worker_id + 1))


def seed_worker(seed: int) -> None:
    """Seed every random stream of this process (a worker, or the main process)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset if info is not None else None
    if getattr(dataset, "augmentation", None) is not None:
        dataset.augmentation.seed(seed)


class SeededLoader(DataLoader):
    """A DataLoader whose shuffling and worker seeds restart from (seed, epoch) each epoch,
    and whose workers' data errors reach the user as one line.

    With ``persistent_workers`` the workers are seeded once (epoch 0) and keep their
    streams, so epochs still differ and runs still repeat.
    """

    def __init__(self, dataset: Dataset, seed: int, **kwargs) -> None:
        self.seeder = WorkerSeeder(seed)
        super().__init__(
            dataset, generator=torch.Generator().manual_seed(epoch_seed(seed, 0)),
            worker_init_fn=self.seeder, **kwargs,
        )

    def __iter__(self):
        """Batches; a data error raised in a worker comes back as its own one-line message."""
        try:
            yield from super().__iter__()
        except TrainlabError as err:
            if self.num_workers == 0:
                raise
            last = str(err).strip().splitlines()[-1]
            message = last.removeprefix(f"{TrainlabError.__module__}.TrainlabError: ")
            raise TrainlabError(message) from None

    def set_epoch(self, epoch: int) -> None:
        self.seeder.epoch = epoch
        self.generator.manual_seed(epoch_seed(self.seeder.seed, epoch))
        augmentation = getattr(self.dataset, "augmentation", None)
        if self.num_workers == 0 and augmentation is not None:
            augmentation.seed(epoch_seed(self.seeder.seed, epoch, 0))


def _is_in_memory(dataset: Dataset) -> bool:
    return isinstance(dataset, TensorDataset)


def build_loaders(
    splits: DataSplits, data_cfg: DictConfig, seed: int, device: torch.device,
    augmentation=None, rank: int = 0, world_size: int = 1,
) -> tuple[InMemoryLoader | DataLoader, InMemoryLoader | DataLoader]:
    """Train and validation loaders: the in-memory fast path when both splits allow it.

    ``augmentation`` (an enabled trainlab.data.augment.Augmentation) applies to training only.
    ``batch_size`` is per process. Under DDP each rank gets its shard; validation shards
    are not padded, so metrics summed over ranks are exact.
    """
    if augmentation is not None and not augmentation.enabled:
        augmentation = None
    batch_size = int(data_cfg.batch_size)
    workers = int(data_cfg.get("num_workers", 0))
    drop_last = bool(data_cfg.get("drop_last", False))
    shard = dict(rank=rank, world_size=world_size)
    if workers == 0 and _is_in_memory(splits.train) and _is_in_memory(splits.val):
        return (
            InMemoryLoader(
                splits.train.tensors, batch_size, shuffle=True, drop_last=drop_last,
                seed=seed, device=device, augmentation=augmentation, **shard,
            ),
            InMemoryLoader(
                splits.val.tensors, batch_size, shuffle=False, device=device, pad=False, **shard
            ),
        )
    common = dict(
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=bool(data_cfg.get("pin_memory", False)) and device.type == "cuda",
        persistent_workers=bool(data_cfg.get("persistent_workers", False)) and workers > 0,
    )
    if workers > 0:
        limit_opencv_threads()
    train_set = splits.train
    if augmentation is not None:
        from trainlab.data.augment import AugmentedDataset

        train_set = AugmentedDataset(train_set, augmentation)
    if world_size == 1:
        train = SeededLoader(train_set, seed, shuffle=True, drop_last=drop_last, **common)
        return train, SeededLoader(splits.val, seed, shuffle=False, **common)
    # A rank's shard; the sampler's order is a function of (seed, epoch) like SeededLoader's.
    sampler = DistributedSampler(
        train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
        drop_last=drop_last,
    )
    train = SeededLoader(train_set, seed, sampler=sampler, drop_last=drop_last, **common)
    val = Subset(splits.val, range(rank, len(splits.val), world_size))
    return train, SeededLoader(val, seed, shuffle=False, **common)
