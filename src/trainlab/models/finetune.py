"""Model surgery between build and training: new head, init, weights, freezing, compile.

``build_model`` is the one call train.py makes: it builds ``cfg.model`` without the fine-tune
keys (conf/finetune.yaml) and then applies them in a fixed order, so a user
can start any architecture from any compatible weights file.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trainlab.errors import TrainlabError

log = logging.getLogger(__name__)

FINETUNE_KEYS = (
    "weights_path", "freeze", "freeze_bn", "unfreeze_at_epoch", "init", "head",
    "channels_last", "compile",
)
# Wrappers whose prefix a saved state_dict carries: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where libraries keep the classifier, most specific first (timm tells us via its config).
HEAD_NAMES = ("fc", "classifier", "heads", "head", "outc")


def build_model(node: DictConfig, choice: str | None = None) -> tuple[nn.Module, list]:
    """Build ``node`` (a ``model`` config) and apply its fine-tune options.

    Returns the model and the runner callbacks it needs (gradual unfreezing).
    """
    from trainlab.components import build

    settings = OmegaConf.to_container(node, resolve=True)
    options = {key: settings.pop(key, None) for key in FINETUNE_KEYS}
    model = build(OmegaConf.create(settings), "model", choice)
    return finetune(
        model,
        num_classes=settings.get("num_classes", settings.get("n_classes")),
        pretrained=bool(settings.get("pretrained", False)),
        **options,
    )


def finetune(
    model: nn.Module,
    num_classes: int | None = None,
    pretrained: bool = False,
    weights_path: str | None = None,
    freeze: str | Sequence[str] | None = None,
    freeze_bn: bool = False,
    unfreeze_at_epoch: int | None = None,
    init: str | None = None,
    head: dict | None = None,
    channels_last: bool = False,
    compile: bool = False,
) -> tuple[nn.Module, list]:
    """head → init (not of pretrained parts) → weights → freeze → memory format → compile."""
    from trainlab.models.init import init_weights

    if head:
        if not isinstance(head, dict) or num_classes is None:
            raise TrainlabError(f"model.head={head!r}: give {{hidden: 256, dropout: 0.5}} "
                                "(or null) on a model with num_classes")
        replace_head(model, int(num_classes), head.get("hidden"), float(head.get("dropout", 0.0)))
    if init:
        # Hub weights cover everything but the new head; a weights file overwrites what it has.
        target = model.get_submodule(head_names(model)[0]) if pretrained else model
        init_weights(target, init)
    if weights_path:
        from hydra.utils import to_absolute_path

        load_weights(model, to_absolute_path(str(weights_path)))
    frozen = freeze_layers(model, freeze, freeze_bn)
    callbacks = []
    if unfreeze_at_epoch is not None:
        if not frozen:
            raise TrainlabError("model.unfreeze_at_epoch needs frozen layers: set model.freeze")
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # DDP syncs only the parameters trainable when it wraps the model.
            raise TrainlabError("model.unfreeze_at_epoch does not work with several DDP "
                                "processes; fine-tune in two runs (model.weights_path) instead")
        callbacks.append(GradualUnfreeze(model, int(unfreeze_at_epoch)))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()  # in place: state_dict names and the logged model stay unwrapped
    return model, callbacks


# --------------------------------------------------------------------------- head
def classifier_name(model: nn.Module) -> str:
    """The classifier module's dotted name: timm's ``pretrained_cfg`` classifier (``fc``,
    ``head.fc``), else the first of ``HEAD_NAMES`` holding a Linear/Conv, else the last Linear."""
    modules = dict(model.named_modules())
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    for name in ([classifier] if classifier else []) + list(HEAD_NAMES):
        if name in modules and any(
            isinstance(layer, (nn.Linear, nn.Conv2d)) for layer in modules[name].modules()
        ):
            return name
    linears = [name for name, layer in modules.items() if isinstance(layer, nn.Linear)]
    if not linears:
        raise TrainlabError(f"cannot find the classifier head of {type(model).__name__}")
    return linears[-1]


def head_names(model: nn.Module) -> tuple[str, str]:
    """(the head's top-level module, its last Linear/Conv) by dotted name, e.g. ("fc", "fc")."""
    name = classifier_name(model)
    layers = [
        sub for sub, layer in model.get_submodule(name).named_modules(prefix=name)
        if isinstance(layer, (nn.Linear, nn.Conv2d))
    ]
    return name.split(".")[0], layers[-1]


def replace_head(
    model: nn.Module, num_classes: int, hidden: int | None = None, dropout: float = 0.0
) -> None:
    """A fresh classifier for ``num_classes``: the last Linear (or 1×1 Conv) replaced, or with
    ``hidden`` the whole classifier module replaced by fc1 → ReLU → Dropout → fc2 (keeping
    the parameter-free layers in front of its first Linear, such as a Flatten)."""
    if hidden is None and hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)  # timm knows its own pooling/head layout
        return
    if hidden is None:
        _, name = head_names(model)
        old = model.get_submodule(name)
        if isinstance(old, nn.Conv2d):
            new: nn.Module = nn.Conv2d(old.in_channels, num_classes, old.kernel_size)
        else:
            new = nn.Linear(old.in_features, num_classes)
        model.set_submodule(name, new)
        return
    name = classifier_name(model)
    old = model.get_submodule(name)
    first = next((m for m in old.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise TrainlabError(f"model.head.hidden needs a linear head; {name} is a convolution")
    children = list(old.children()) if isinstance(old, nn.Sequential) else []
    lead = children[: next((i for i, m in enumerate(children) if m is first), 0)]
    if any(True for m in lead for _ in m.parameters()):
        lead = []  # layers with weights in front of the first Linear belong to the old head
    model.set_submodule(name, nn.Sequential(
        *lead,
        nn.Linear(first.in_features, int(hidden)),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(int(hidden), num_classes),
    ))


# ------------------------------------------------------------------------ weights
@dataclass
class LoadReport:
    """What a weights file gave the model: tensors loaded, left missing, unknown, mis-shaped."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    def summary(self) -> str:
        def few(names: list[str]) -> str:
            return ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")

        total = len(self.loaded) + len(self.missing)
        parts = [f"loaded {len(self.loaded)}/{total} tensors from {self.path}"]
        if self.skipped:
            shapes = [f"{name} {list(old)}→{list(new)}" for name, old, new in self.skipped]
            parts.append(f"skipped (shape differs): {few(shapes)}")
        if self.missing:
            parts.append(f"missing (left as built): {few(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected (ignored): {few(self.unexpected)}")
        return "; ".join(parts)


def strip_wrapper_prefixes(key: str) -> str:
    """``module._orig_mod.fc.weight`` → ``fc.weight``."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a plain state_dict or of a checkpoint dict, wrapper prefixes removed."""
    from trainlab.checkpoint import load_checkpoint

    state: dict[str, Any] = load_checkpoint(path)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = {
        strip_wrapper_prefixes(key): value
        for key, value in state.items() if isinstance(value, torch.Tensor)
    }
    if not tensors:
        raise TrainlabError(
            f"{path} holds no model weights (top-level keys: {sorted(map(str, state))[:8]}); "
            "model.weights_path wants a state_dict or a trainlab checkpoint"
        )
    return tensors


def load_weights(model: nn.Module, path: str, strict: bool = False) -> LoadReport:
    """Load what fits from ``path``: tensors whose name and shape match the model.

    A file matching nothing is an error (never a silently random model); ``strict`` also
    refuses anything missing or mis-shaped (evaluating a trained model).
    """
    source = read_state_dict(path)
    target = model.state_dict()
    # A wrapped model (DDP, torch.compile) names its tensors with the wrapper's prefix.
    target_name = {strip_wrapper_prefixes(name): name for name in target}
    report = LoadReport(str(path))
    matched = {}
    for name, tensor in source.items():
        if name not in target_name:
            report.unexpected.append(name)
        elif tensor.shape != target[target_name[name]].shape:
            shape = tuple(target[target_name[name]].shape)
            report.skipped.append((name, tuple(tensor.shape), shape))
        else:
            matched[target_name[name]] = tensor
    report.loaded = list(matched)
    report.missing = [name for name in target if name not in matched]
    if not matched:
        raise TrainlabError(
            f"{path} matches none of the model's {len(target)} tensors (file has e.g. "
            f"{list(source)[:3]}, model has e.g. {list(target)[:3]}); is it a checkpoint of "
            f"this architecture?"
        )
    # Frozen BatchNorm (timm) has no step counter; nothing else may be absent.
    absent = [name for name in report.missing if not name.endswith("num_batches_tracked")]
    if strict and (absent or report.skipped or report.unexpected):
        raise TrainlabError(f"weights do not fit the model: {report.summary()}")
    model.load_state_dict(matched, strict=False)
    log.info(report.summary())
    return report


# ------------------------------------------------------------------------ freezing
def freeze_layers(
    model: nn.Module, spec: str | Sequence[str] | None, freeze_bn: bool = False
) -> list[str]:
    """Stop gradients for ``spec`` (``none``, ``backbone`` or name patterns); returns the
    frozen parameter names. ``freeze_bn`` turns fully frozen BatchNorm layers into timm's
    FrozenBatchNorm2d, so training mode no longer updates their running statistics."""
    if spec in (None, "none", []):
        return []
    if spec == "backbone":
        head = head_names(model)[0]

        def is_frozen(name: str) -> bool:
            return not (name == head or name.startswith(head + "."))
    elif isinstance(spec, str):
        raise TrainlabError(
            f"model.freeze={spec!r}; choose none, backbone or a list of name patterns "
            "like [conv1.*, layer1.*]"
        )
    else:
        patterns = [str(pattern) for pattern in spec]

        def is_frozen(name: str) -> bool:
            return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    frozen = [name for name, _ in model.named_parameters() if is_frozen(name)]
    if not frozen:
        names = [name for name, _ in model.named_parameters()][:6]
        raise TrainlabError(f"model.freeze={spec} matches no parameter (names look like {names})")
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    if freeze_bn:
        from timm.layers import freeze_batch_norm_2d

        for name, layer in list(model.named_modules()):
            if isinstance(layer, nn.BatchNorm2d) and not any(
                p.requires_grad for p in layer.parameters()
            ):
                model.set_submodule(name, freeze_batch_norm_2d(layer))
    log.info("froze %d parameter tensors (model.freeze=%s)", len(frozen), spec)
    return frozen


class GradualUnfreeze:
    """Runner callback: after ``at_epoch`` epochs every layer trains.

    Newly trainable parameters join the optimizer in the groups its config gives them
    (backbone lr, no decay on norms and biases, layer-wise decay), named ``unfrozen`` (or
    ``unfrozen_<group>``), and follow the schedule the first group has been on so far,
    scaled to their own configured lr.
    """

    def __init__(self, model: nn.Module, at_epoch: int) -> None:
        self.model = model
        self.at_epoch = at_epoch

    def on_epoch_end(self, runner: Any, epoch: int, metrics: dict) -> None:
        if epoch + 1 == self.at_epoch:
            self.unfreeze(runner, epoch + 1)

    def on_resume(self, runner: Any, epochs_done: int) -> None:
        """A checkpoint written after the unfreezing holds the unfrozen layers (BatchNorm
        no longer frozen) and their param group: unfreeze before it is loaded, so it fits."""
        if epochs_done >= self.at_epoch:
            self.unfreeze(runner, self.at_epoch)

    def unfreeze(self, runner: Any, after_epoch: int) -> None:
        from timm.layers import unfreeze_batch_norm_2d

        from trainlab.schedulers import add_param_group

        device = next(self.model.parameters()).device
        unfreeze_batch_norm_2d(self.model).to(device)
        optimizer = runner.optimizer
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        new = [p for p in self.model.parameters() if id(p) not in known]
        for param in new:
            param.requires_grad_(True)
        ema = getattr(runner, "ema", None)
        if ema is not None:  # the average keeps the same layers, as trainable as the model's
            unfreeze_batch_norm_2d(ema.module).to(device)
            pairs = zip(ema.module.parameters(), self.model.parameters(), strict=True)
            for averaged, param in pairs:
                averaged.requires_grad_(param.requires_grad)
        if not new:
            return
        scheduler = getattr(getattr(runner, "scheduler", None), "scheduler", None)
        for group, lr_scale in _joining_groups(optimizer, self.model, new):
            add_param_group(optimizer, scheduler, group, lr_scale=lr_scale)
        log.info("epoch %d: unfroze %d parameter tensors", after_epoch, len(new))


def _joining_groups(optimizer, model: nn.Module, new: list) -> list[tuple[dict, float]]:
    """The groups ``new`` parameters join, each with its lr relative to the first group's:
    as the optimizer's grouping rule places them among every trainable parameter."""
    from trainlab.optim import GROUPING

    grouping = getattr(optimizer, GROUPING, None)
    placed = grouping(model) if grouping is not None else []
    reference = optimizer.param_groups[0]["params"][0]
    base_lr = next((g["lr"] for g in placed if any(p is reference for p in g["params"])), None)
    if base_lr is None:  # an optimizer built elsewhere: one group on the first one's lr
        return [({"params": new, "name": "unfrozen"}, 1.0)]
    joining = {id(p) for p in new}
    groups = []
    for target in placed:
        params = [p for p in target["params"] if id(p) in joining]
        if params:
            name = "unfrozen" if target["name"] == "backbone" else f"unfrozen_{target['name']}"
            groups.append(({"params": params, "name": name,
                            "weight_decay": target["weight_decay"]}, target["lr"] / base_lr))
    return groups
