"""Batches for the runner: a fast path for in-memory tensors, torch's DataLoader otherwise."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, TensorDataset

from trainlab.data.datasets import DataSplits


class InMemoryLoader:
    """Batches sliced from tensors already in memory (and on the device).

    Per-sample ``__getitem__`` plus collate costs more than the forward pass of a small
    model; shuffling the whole tensor once per epoch and slicing views costs nearly nothing.
    The order is a function of (seed, epoch), like a seeded DataLoader's.
    """

    def __init__(
        self,
        tensors: tuple[torch.Tensor, ...],
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.tensors = tuple(t.to(device) for t in tensors)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.dataset = TensorDataset(*self.tensors)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.tensors[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        tensors = self.tensors
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(tensors[0]), generator=generator).to(tensors[0].device)
            tensors = tuple(t[order] for t in tensors)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield tuple(t[start : start + self.batch_size] for t in tensors)


def _is_in_memory(dataset: Dataset) -> bool:
    return isinstance(dataset, TensorDataset)


def build_loaders(
    splits: DataSplits, data_cfg: DictConfig, seed: int, device: torch.device
) -> tuple[InMemoryLoader | DataLoader, InMemoryLoader | DataLoader]:
    """Train and validation loaders: the in-memory fast path when both splits allow it."""
    batch_size = int(data_cfg.batch_size)
    workers = int(data_cfg.get("num_workers", 0))
    if workers == 0 and _is_in_memory(splits.train) and _is_in_memory(splits.val):
        return (
            InMemoryLoader(
                splits.train.tensors, batch_size, shuffle=True,
                drop_last=bool(data_cfg.get("drop_last", False)), seed=seed, device=device,
            ),
            InMemoryLoader(splits.val.tensors, batch_size, shuffle=False, device=device),
        )
    common = dict(
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=bool(data_cfg.get("pin_memory", False)) and device.type == "cuda",
        persistent_workers=bool(data_cfg.get("persistent_workers", False)) and workers > 0,
    )
    train = DataLoader(
        splits.train, shuffle=True, drop_last=bool(data_cfg.get("drop_last", False)),
        generator=torch.Generator().manual_seed(seed), **common,
    )
    return train, DataLoader(splits.val, shuffle=False, **common)
