"""Numeric precision of the forward pass: which autocast context and whether to scale losses."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

from trainlab.errors import TrainlabError

MODES = ("fp32",)


class Precision:
    """Wraps the forward pass in the autocast context of ``mode`` for ``device``."""

    def __init__(self, mode: str = "fp32") -> None:
        if mode not in MODES:
            raise TrainlabError(f"precision.mode={mode!r} is not known; choose one of {MODES}")
        self.mode = mode
        self.device = torch.device("cpu")

    def setup(self, device: torch.device) -> None:
        self.device = device

    def autocast(self) -> AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer; returns whether the step really happened."""
        optimizer.step()
        return True
