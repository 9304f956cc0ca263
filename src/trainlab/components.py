"""Build config nodes into objects, turning Hydra's instantiation errors into one clear line."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from trainlab.errors import TrainlabError


def build(node: DictConfig, group: str, choice: str | None = None, **kwargs: Any) -> Any:
    """Instantiate ``node`` (the config of ``group``), naming the config file if it fails."""
    where = f"conf/{group}/{choice}.yaml" if choice else f"config group '{group}'"
    target = node.get("_target_")
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, TrainlabError):  # already one line naming the key and value
            raise cause from None
        if "Error locating target" in str(err):
            raise TrainlabError(
                f"{where}: _target_ '{target}' cannot be imported ({cause})"
            ) from err
        raise TrainlabError(f"{where}: building '{target}' failed: {cause}") from err
