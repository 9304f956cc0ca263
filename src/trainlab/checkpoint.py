"""Checkpoints on disk: written atomically, read back without executing pickled code."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainlab.errors import TrainlabError


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` via a temp file and rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; a missing, truncated or foreign file is a
    ``TrainlabError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TrainlabError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe files
        raise TrainlabError(f"{path} is not a readable checkpoint: {err}") from err
    if not isinstance(state, dict):
        raise TrainlabError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state
