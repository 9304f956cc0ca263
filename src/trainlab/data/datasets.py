"""Where images come from: each loader returns train and validation datasets."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, TensorDataset


@dataclass
class DataSplits:
    """The datasets of one data config, and the class names when the source has them."""

    train: Dataset
    val: Dataset
    class_names: list[str] = field(default_factory=list)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random train/val split of ``range(n)``: the same seed, the same split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return order[n_val:], order[:n_val]


def load_digits(val_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """scikit-learn's bundled 8x8 digits as (N, 1, 8, 8) floats in [0, 1]; no download."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    targets = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, val_idx = split_indices(len(targets), val_fraction, seed)
    return DataSplits(
        train=TensorDataset(images[train_idx], targets[train_idx]),
        val=TensorDataset(images[val_idx], targets[val_idx]),
        class_names=[str(name) for name in bunch.target_names],
    )
