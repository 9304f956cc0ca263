"""A model of this project: two convolutions, global pooling and a linear classifier."""

from __future__ import annotations

from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)  # `fc`: fine-tune options find the head

    def forward(self, x):
        return self.fc(self.features(x))
