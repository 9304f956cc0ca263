"""Optimizers from config, with parameter groups for fine-tuning and weight-decay hygiene.

Besides the optimizer's own arguments, the config may hold:
- ``head_lr``: a different lr for the parameters whose names match ``head`` (glob patterns
  such as ``classifier.*``); the rest (the backbone) keeps ``lr``.
- ``no_decay_norm_bias``: no weight decay on normalization layers' weights and on biases.
Frozen parameters (``requires_grad=False``) are never handed to the optimizer.
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trainlab.components import build
from trainlab.errors import TrainlabError

OUR_KEYS = ("head_lr", "head", "no_decay_norm_bias")
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of biases and of normalization layers' parameters."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            if param_name == "bias" or isinstance(module, NORM_LAYERS):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    head_lr: float | None = None,
    head: list[str] | tuple[str, ...] = (),
    no_decay_norm_bias: bool = False,
) -> list[dict]:
    """The model's trainable parameters split into named groups (``backbone``, ``head``, …)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise TrainlabError("the model has no trainable parameters (all are frozen)")
    no_decay = _no_decay_names(model) if no_decay_norm_bias else set()
    groups: dict[str, dict] = {}
    for name, param in trainable:
        in_head = head_lr is not None and any(fnmatch(name, pattern) for pattern in head)
        part = "head" if in_head else "backbone"
        decays = name not in no_decay
        key = part if decays else f"{part}_no_decay"
        group = groups.setdefault(key, {
            "name": key,
            "params": [],
            "lr": head_lr if in_head else lr,
            "weight_decay": weight_decay if decays else 0.0,
        })
        group["params"].append(param)
    if head_lr is not None and not any(key.startswith("head") for key in groups):
        top = sorted({name.split(".")[0] for name, _ in trainable})
        raise TrainlabError(
            f"optimizer.head={list(head)} matches no trainable parameter, so optimizer.head_lr "
            f"has nothing to act on; the model's top-level modules are {top} "
            "(patterns are globs over parameter names, e.g. 'classifier.*')"
        )
    return list(groups.values())


def build_optimizer(
    node: DictConfig, model: nn.Module, choice: str | None = None
) -> torch.optim.Optimizer:
    """The optimizer of config ``node`` over ``model``'s trainable parameters, in groups."""
    options = OmegaConf.to_container(node, resolve=True)
    ours = {key: options.pop(key) for key in OUR_KEYS if key in options}
    groups = param_groups(
        model,
        lr=options.get("lr", 1e-3),
        weight_decay=options.get("weight_decay", 0.0),
        head_lr=ours.get("head_lr"),
        head=ours.get("head") or (),
        no_decay_norm_bias=bool(ours.get("no_decay_norm_bias", False)),
    )
    return build(OmegaConf.create(options), "optimizer", choice)(groups)
