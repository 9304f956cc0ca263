"""The course's FashionMNIST CNN, sized from the data it is given."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class CourseCNN(nn.Module):
    """conv → ReLU → max-pool → dropout, twice, then a two-layer classifier head.

    With ``padding=None`` the convolutions are unpadded as in the course when the image is
    large enough (28x28 → 4x4 features) and "same"-padded when it is not (8x8 digits).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: Sequence[int] = (28, 28),
        channels: Sequence[int] = (32, 64),
        kernel_size: int = 5,
        padding: int | None = None,
        hidden: int = 512,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if padding is None:
            shrink_ok = min(height, width) >= 4 * kernel_size
            padding = 0 if shrink_ok else kernel_size // 2
        layers: list[nn.Module] = []
        previous = in_channels
        for width_out in channels:
            layers += [
                nn.Conv2d(previous, width_out, kernel_size, padding=padding),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, stride=2),
                nn.Dropout(dropout),
            ]
            previous = width_out
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, height, width)).numel()
        if flat == 0:
            raise ValueError(f"image_size {height}x{width} is too small for kernel {kernel_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
