"""Optimizers from config, with parameter groups for fine-tuning and weight-decay hygiene.

Besides the optimizer's own arguments, the config may hold:
- ``head_lr``: a different lr for the parameters whose names match ``head`` (glob patterns
  such as ``classifier.*``); the rest (the backbone) keeps ``lr``.
- ``no_decay_norm_bias``: no weight decay on normalization layers' weights and on biases.
- ``layer_decay``: layer-wise lr decay as timm does it (BEiT): the head trains at ``lr``,
  each block/stage before it at ``layer_decay`` times the next one's lr.
Frozen parameters (``requires_grad=False``) are never handed to the optimizer.
"""

from __future__ import annotations

from fnmatch import fnmatch
from functools import partial

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trainlab.components import build
from trainlab.errors import TrainlabError

OUR_KEYS = ("head_lr", "head", "no_decay_norm_bias", "layer_decay")
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


# The optimizer's attribute holding its grouping rule (model → groups), so parameters that
# become trainable mid-run (gradual unfreezing) join the group their config gives them.
GROUPING = "trainlab_grouping"


def build_optimizer(
    node: DictConfig, model: nn.Module, choice: str | None = None
) -> torch.optim.Optimizer:
    """The optimizer of config ``node`` over ``model``'s trainable parameters, in groups."""
    options = OmegaConf.to_container(node, resolve=True)
    ours = {key: options.pop(key) for key in OUR_KEYS if key in options}
    grouping = partial(_groups, lr=options.get("lr", 1e-3),
                       weight_decay=options.get("weight_decay", 0.0), **ours)
    optimizer = build(OmegaConf.create(options), "optimizer", choice)(grouping(model))
    setattr(optimizer, GROUPING, grouping)
    return optimizer


def _groups(model: nn.Module, lr: float, weight_decay: float, head_lr: float | None = None,
            head: list[str] | None = None, no_decay_norm_bias: bool = False,
            layer_decay: float | None = None) -> list[dict]:
    """``model``'s trainable parameters in the groups the optimizer config asks for."""
    if layer_decay is not None:
        return layer_decay_groups(model, float(layer_decay), lr=lr, weight_decay=weight_decay,
                                  no_decay_norm_bias=bool(no_decay_norm_bias), head_lr=head_lr)
    return param_groups(model, lr=lr, weight_decay=weight_decay, head_lr=head_lr,
                        head=head or (), no_decay_norm_bias=bool(no_decay_norm_bias))


def layer_decay_groups(
    model: nn.Module, layer_decay: float, lr: float, weight_decay: float = 0.0,
    no_decay_norm_bias: bool = False, head_lr: float | None = None,
) -> list[dict]:
    """timm's layer-wise lr decay groups (``layer<i>``, 0 nearest the input) with each
    group's lr set to ``lr`` × its scale, so torch's optimizers and schedulers use it."""
    from timm.optim import param_groups_layer_decay

    if not 0 < layer_decay <= 1:
        raise TrainlabError(f"optimizer.layer_decay={layer_decay}; choose a value in (0, 1]")
    if head_lr is not None:
        raise TrainlabError("optimizer.layer_decay already gives the head the highest lr; "
                            "unset optimizer.head_lr (or optimizer.layer_decay)")
    if not hasattr(model, "group_matcher"):
        raise TrainlabError(
            f"optimizer.layer_decay needs a model with stages or blocks that timm can group "
            f"(model=timm); {type(model).__name__} has none"
        )
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_layer_decay(
        model, weight_decay=weight_decay, layer_decay=layer_decay,
        no_weight_decay_list=skip, weight_decay_exclude_1d=no_decay_norm_bias,
    )
    scales = sorted({group["lr_scale"] for group in groups})
    for group in groups:
        scale = group.pop("lr_scale")
        decay = "" if group["weight_decay"] or not weight_decay else "_no_decay"
        group.update(name=f"layer{scales.index(scale)}{decay}", lr=lr * scale)
    return groups
