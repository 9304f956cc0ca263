"""Weight initialisation by layer type, chosen by name from the config (``model.init``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from trainlab.errors import TrainlabError

# Rules for conv/linear weights; ReLU gain where the scheme takes one.
SCHEMES: dict[str, Callable] = {
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"),
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "xavier_normal": lambda w: nn.init.xavier_normal_(w, gain=nn.init.calculate_gain("relu")),
    "xavier_uniform": lambda w: nn.init.xavier_uniform_(w, gain=nn.init.calculate_gain("relu")),
    "normal": lambda w: nn.init.normal_(w, mean=0.0, std=0.01),
    "orthogonal": lambda w: nn.init.orthogonal_(w),
}

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def init_weights(module: nn.Module, scheme: str) -> int:
    """Initialise every conv/linear weight of ``module`` with ``scheme`` (biases to zero) and
    every norm layer to identity (weight 1, bias 0). Returns how many layers were touched."""
    if scheme not in SCHEMES:
        raise TrainlabError(f"model.init={scheme!r} is unknown; choose one of {sorted(SCHEMES)}")
    rule = SCHEMES[scheme]
    touched = 0
    for layer in module.modules():
        if isinstance(layer, WEIGHTED):
            rule(layer.weight)
        elif isinstance(layer, NORMS) and getattr(layer, "weight", None) is not None:
            nn.init.ones_(layer.weight)
        else:
            continue
        if getattr(layer, "bias", None) is not None:
            nn.init.zeros_(layer.bias)
        touched += 1
    return touched
