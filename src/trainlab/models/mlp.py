"""A multi-layer perceptron over flattened images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten → (Linear → ReLU → Dropout) per hidden width → Linear to the classes."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: Sequence[int] = (28, 28),
        hidden: Sequence[int] = (256,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else image_size
        previous = in_channels * math.prod(size)
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(previous, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            previous = width
        layers.append(nn.Linear(previous, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
