"""Numeric precision: the autocast context of the forward pass and the loss scaling of fp16."""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from typing import Any

import torch

from trainlab.errors import TrainlabError

log = logging.getLogger(__name__)

MODES = ("fp32", "fp16", "bf16")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Precision:
    """``fp32``; ``fp16`` (autocast + GradScaler, GPU only); ``bf16`` (autocast, no scaler,
    also on CPU). ``tf32`` lets CUDA matmuls/convolutions of fp32 tensors use TF32 cores."""

    def __init__(self, mode: str = "fp32", tf32: bool = False) -> None:
        if mode not in MODES:
            raise TrainlabError(f"precision.mode={mode!r} is not known; choose one of {MODES}")
        self.mode = mode
        self.tf32 = bool(tf32)
        self.device = torch.device("cpu")
        self.scaler: torch.amp.GradScaler | None = None

    def setup(self, device: torch.device) -> None:
        """Bind to ``device``: checks the mode is possible there and makes the scaler."""
        self.device = device
        if self.mode == "fp16" and device.type not in ("cuda", "mps"):
            raise TrainlabError(
                f"precision=fp16 needs a GPU (float16 autocast with loss scaling) but the run "
                f"is on {device.type}; use precision=bf16, which autocasts on the CPU too"
            )
        if self.mode == "fp16":
            self.scaler = torch.amp.GradScaler(device.type)
        if self.tf32:
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            else:
                log.warning("precision.tf32 only affects CUDA GPUs; ignored on %s", device.type)

    def autocast(self) -> AbstractContextManager:
        if self.mode in DTYPES:
            return torch.autocast(self.device.type, dtype=DTYPES[self.mode])
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true size (before clipping them)."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer; returns whether the step really happened.

        GradScaler skips steps whose gradients hold inf/NaN and then lowers its scale; the
        scale comparison reads it on the host, which GradScaler's own step already does.
        """
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)
