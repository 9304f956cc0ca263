"""Batches for the runner: a fast path for in-memory tensors, torch's DataLoader otherwise."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from trainlab.data.datasets import DataSplits


class InMemoryLoader:
    """Batches sliced from tensors already in memory (and on the device).

    Per-sample ``__getitem__`` plus collate costs more than the forward pass of a small
    model; shuffling the whole tensor once per epoch and slicing views costs nearly nothing.
    The order is a function of (seed, epoch), like a seeded DataLoader's. As one of
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
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ) -> None:
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield tuple(t[start : start + self.batch_size] for t in tensors)


def _is_in_memory(dataset: Dataset) -> bool:
    return isinstance(dataset, TensorDataset)


def build_loaders(
    splits: DataSplits, data_cfg: DictConfig, seed: int, device: torch.device,
    rank: int = 0, world_size: int = 1,
) -> tuple[InMemoryLoader | DataLoader, InMemoryLoader | DataLoader]:
    """Train and validation loaders: the in-memory fast path when both splits allow it.

    ``batch_size`` is per process. Under DDP each rank gets its shard; validation shards
    are not padded, so metrics averaged over ranks by sample count are exact.
    """
    batch_size = int(data_cfg.batch_size)
    workers = int(data_cfg.get("num_workers", 0))
    shard = dict(rank=rank, world_size=world_size)
    if workers == 0 and _is_in_memory(splits.train) and _is_in_memory(splits.val):
        return (
            InMemoryLoader(
                splits.train.tensors, batch_size, shuffle=True,
                drop_last=bool(data_cfg.get("drop_last", False)), seed=seed, device=device,
                **shard,
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
    # The sampler's order is a function of (seed, epoch): a resumed run sees the same batches.
    sampler = DistributedSampler(
        splits.train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
        drop_last=bool(data_cfg.get("drop_last", False)),
    )
    train = DataLoader(
        splits.train, sampler=sampler, drop_last=bool(data_cfg.get("drop_last", False)),
        **common,
    )
    val = Subset(splits.val, range(rank, len(splits.val), world_size))
    return train, DataLoader(val if world_size > 1 else splits.val, shuffle=False, **common)
