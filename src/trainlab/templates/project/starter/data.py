"""A dataset of this project: small grayscale images of stripes, generated from a seed.

Replace it with a loader of your own files: return a DataSplits of two torch Datasets
whose items are (image tensor C×H×W in [0, 1], class index).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from trainlab.data.datasets import DataSplits, split_indices

CLASSES = ["horizontal", "vertical", "diagonal"]


def load_stripes(n: int = 600, size: int = 16, noise: float = 0.2, val_fraction: float = 0.2,
                 seed: int = 0) -> DataSplits:
    """``n`` images of stripes in one of three directions, with random period, phase and
    noise; the same seed gives the same images and the same split."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (n,), generator=generator)
    period = torch.randint(3, 7, (n, 1, 1), generator=generator).float()
    phase = torch.rand(n, 1, 1, generator=generator) * 2 * math.pi
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    position = torch.stack([y, x, (x + y) / math.sqrt(2)])[labels]  # one axis per class
    images = 0.5 + 0.5 * torch.sin(2 * math.pi * position / period + phase)
    images = (images + noise * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    images = images.unsqueeze(1)
    train, val = split_indices(n, val_fraction, seed)
    return DataSplits(
        train=TensorDataset(images[train], labels[train]),
        val=TensorDataset(images[val], labels[val]),
        class_names=list(CLASSES),
    )
