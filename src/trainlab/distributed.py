"""Which device a run uses, chosen from ``trainer.accelerator``."""

from __future__ import annotations

import torch

from trainlab.errors import TrainlabError

ACCELERATORS = ("auto", "cpu", "cuda", "mps")


def select_device(accelerator: str = "auto") -> torch.device:
    """The device for ``accelerator``; a clear error when that hardware is absent."""
    if accelerator not in ACCELERATORS:
        raise TrainlabError(
            f"trainer.accelerator={accelerator!r} is not known; choose one of {ACCELERATORS}"
        )
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if accelerator == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if accelerator == "cuda" and not cuda:
        raise TrainlabError("trainer.accelerator=cuda but no CUDA GPU is visible; use cpu or auto")
    if accelerator == "mps" and not mps:
        raise TrainlabError("trainer.accelerator=mps but MPS is not available; use cpu or auto")
    return torch.device(accelerator)
