"""Losses of this project: one as a plain function, one as an nn.Module.

A function is configured with `_partial_: true` (the runner calls it with outputs and
targets); a module is built once with its arguments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def smooth_ce(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.1):
    """Cross-entropy against labels smoothed towards the uniform distribution."""
    return F.cross_entropy(logits, targets, label_smoothing=smoothing)


class FocalCE(nn.Module):
    """Focal loss: cross-entropy scaled down on examples the model already gets right."""

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
        return (-(1 - log_p.exp()) ** self.gamma * log_p).mean()
