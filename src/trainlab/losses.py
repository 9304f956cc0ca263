"""Losses for segmentation and imbalance, and the check that a loss fits the data's task.

Each of ours works in two forms, chosen by the shape of the model's output:
binary (one output channel, or outputs shaped like the targets: sigmoid) and multi-class
(C channels: softmax over channels, targets are class indices). Outputs are (N, C, *) —
(N, C) for classification, (N, C, H, W) for segmentation — and targets (N, *).
Region losses (dice, iou, tversky) sum over the batch and all pixels per class, then
reduce over classes; ``ignore_index`` pixels take no part in any sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trainlab.components import build
from trainlab.errors import TrainlabError

REDUCTIONS = ("mean", "sum", "none")
TENSOR_ARGS = ("weight", "pos_weight")  # list values in YAML, tensors for torch


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise TrainlabError(f"loss reduction={reduction!r}; choose one of {REDUCTIONS}")


def _binary(logits: torch.Tensor, targets: torch.Tensor) -> bool:
    return logits.dim() == targets.dim() or logits.shape[1] == 1


def _valid(targets: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    if ignore_index is None:
        return torch.ones_like(targets, dtype=torch.bool)
    return targets != ignore_index


def _probs_and_onehot(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and one-hot targets, (N, C, S), both zero on ignored pixels."""
    n = logits.shape[0]
    if _binary(logits, targets):
        probs = torch.sigmoid(logits).reshape(n, 1, -1)
        targets = targets.reshape(n, 1, -1)
        valid = _valid(targets, ignore_index)
        return probs * valid, torch.where(valid, targets, 0).to(probs.dtype)
    classes = logits.shape[1]
    probs = torch.softmax(logits, dim=1).reshape(n, classes, -1)
    targets = targets.reshape(n, -1).long()
    valid = _valid(targets, ignore_index)
    onehot = F.one_hot(torch.where(valid, targets, 0), classes).permute(0, 2, 1).to(probs.dtype)
    mask = valid.unsqueeze(1)
    return probs * mask, onehot * mask


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    return values.sum() if reduction == "sum" else values


class _RegionLoss(nn.Module):
    """1 − a per-class overlap score over (true positives, false positives, false negatives)."""

    def __init__(
        self, smooth: float = 1.0, ignore_index: int | None = None, reduction: str = "mean"
    ) -> None:
        super().__init__()
        _check_reduction(reduction)
        self.smooth, self.ignore_index, self.reduction = smooth, ignore_index, reduction

    def score(self, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probs, onehot = _probs_and_onehot(logits, targets, self.ignore_index)
        dims = (0, 2)  # batch and pixels; ignored pixels have probs = onehot = 0
        tp = (probs * onehot).sum(dims)
        fp = (probs * (1 - onehot)).sum(dims)
        fn = ((1 - probs) * onehot).sum(dims)
        return _reduce(1 - self.score(tp, fp, fn), self.reduction)


class DiceLoss(_RegionLoss):
    """1 − Dice = 1 − (2·TP + smooth) / (2·TP + FP + FN + smooth), per class."""

    def score(self, tp, fp, fn):
        return (2 * tp + self.smooth) / (2 * tp + fp + fn + self.smooth)


class IoULoss(_RegionLoss):
    """1 − Jaccard = 1 − (TP + smooth) / (TP + FP + FN + smooth), per class."""

    def score(self, tp, fp, fn):
        return (tp + self.smooth) / (tp + fp + fn + self.smooth)


class TverskyLoss(_RegionLoss):
    """1 − (TP + smooth) / (TP + α·FP + β·FN + smooth); α = β = 0.5 is Dice; β > α: recall."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha, self.beta = alpha, beta

    def score(self, tp, fp, fn):
        return (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)


def _elementwise_ce(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element cross-entropy, the probability of the true class, and the valid mask."""
    if _binary(logits, targets):
        logits = logits.reshape(targets.shape)
        valid = _valid(targets, ignore_index)
        t = torch.where(valid, targets, 0).to(logits.dtype)
        ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        p = torch.sigmoid(logits)
        return ce, p * t + (1 - p) * (1 - t), valid
    targets = targets.long()
    valid = _valid(targets, ignore_index)
    safe = torch.where(valid, targets, 0)
    ce = -torch.log_softmax(logits, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
    return ce, torch.exp(-ce), valid


def _masked_reduce(values: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    values = values * valid
    if reduction == "mean":
        return values.sum() / valid.sum().clamp_min(1)
    return values.sum() if reduction == "sum" else values


class FocalLoss(nn.Module):
    """Focal loss: α_t · (1 − p_t)^γ · CE per element, then reduced (not the focal of a mean).

    ``alpha``: binary → weight of the positive class (negatives get 1 − alpha);
    multi-class → one weight per class (a list), or one number for every class.
    ``None`` weighs all alike.
    """

    def __init__(
        self,
        alpha: float | list[float] | None = None,
        gamma: float = 2.0,
        ignore_index: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        _check_reduction(reduction)
        self.gamma, self.ignore_index, self.reduction = gamma, ignore_index, reduction
        # a number weighs every class alike (multi-class) or the positives (binary)
        self.register_buffer(
            "alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float)
        )

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce, p_t, valid = _elementwise_ce(logits, targets, self.ignore_index)
        loss = (1 - p_t) ** self.gamma * ce
        if self.alpha is not None:
            alpha = self.alpha.to(logits.dtype)
            if _binary(logits, targets):
                t = torch.where(valid, targets, 0).to(logits.dtype)
                loss = loss * (alpha * t + (1 - alpha) * (1 - t))
            elif alpha.dim() == 0:
                loss = loss * alpha
            else:
                loss = loss * alpha[torch.where(valid, targets.long(), 0)]
        return _masked_reduce(loss, valid, self.reduction)


class DiceBCELoss(nn.Module):
    """``bce_weight`` · cross-entropy (BCE binary, CE multi-class) + ``dice_weight`` · Dice."""

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        smooth: float = 1.0,
        ignore_index: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if reduction == "none":
            raise TrainlabError("loss=dice_bce sums two losses of different shapes; "
                                "choose reduction 'mean' or 'sum'")
        self.bce_weight, self.dice_weight = bce_weight, dice_weight
        self.ignore_index, self.reduction = ignore_index, reduction
        self.dice = DiceLoss(smooth=smooth, ignore_index=ignore_index, reduction=reduction)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce, _, valid = _elementwise_ce(logits, targets, self.ignore_index)
        bce = _masked_reduce(ce, valid, self.reduction)
        return self.bce_weight * bce + self.dice_weight * self.dice(logits, targets)


# ------------------------------------------------------------ the loss <-> model contract
CLASSIFICATION, SEGMENTATION, BINARY = "classification", "segmentation", "binary segmentation"
KINDS = (CLASSIFICATION, SEGMENTATION, BINARY)


@dataclass(frozen=True)
class Contract:
    """What a loss takes from the model and the data, and which tasks that makes it fit.

    ``takes``: ``logits`` (raw outputs), ``log_probs`` (log-softmax over classes, log-sigmoid
    for one channel) or ``probs`` (softmax, sigmoid). ``targets``: ``indices`` (class
    labels as the data gives them) or ``dense`` (float one-hot shaped like the outputs, the
    0/1 mask for one channel). Models always emit logits; ``ModelOutputLoss`` puts the
    activation and the target encoding between them, so metrics, eval and predict read the
    same logits whatever the loss.
    """

    name: str
    takes: str = "logits"
    targets: str = "indices"
    kinds: tuple[str, ...] = KINDS


_DENSE_EVERYWHERE = dict(targets="dense", kinds=KINDS)
CONTRACTS: dict[type, Contract] = {
    nn.CrossEntropyLoss: Contract("ce", kinds=(CLASSIFICATION, SEGMENTATION)),
    nn.NLLLoss: Contract("nll", "log_probs", kinds=(CLASSIFICATION, SEGMENTATION)),
    FocalLoss: Contract("focal"),
    nn.BCEWithLogitsLoss: Contract("bce_logits", **_DENSE_EVERYWHERE),
    nn.BCELoss: Contract("bce", "probs", **_DENSE_EVERYWHERE),
    # regression on probabilities: the Brier score (mse), its robust variants
    nn.L1Loss: Contract("l1", "probs", **_DENSE_EVERYWHERE),
    nn.MSELoss: Contract("mse", "probs", **_DENSE_EVERYWHERE),
    nn.SmoothL1Loss: Contract("smooth_l1", "probs", **_DENSE_EVERYWHERE),
    nn.HuberLoss: Contract("huber", "probs", **_DENSE_EVERYWHERE),
    # KL(target distribution ‖ model): one-hot here, a teacher's probabilities when distilling
    nn.KLDivLoss: Contract("kl_div", "log_probs", "dense", (CLASSIFICATION, SEGMENTATION)),
    # region losses measure the overlap of masks
    DiceLoss: Contract("dice", kinds=(SEGMENTATION, BINARY)),
    IoULoss: Contract("iou", kinds=(SEGMENTATION, BINARY)),
    TverskyLoss: Contract("tversky", kinds=(SEGMENTATION, BINARY)),
    DiceBCELoss: Contract("dice_bce", kinds=(SEGMENTATION, BINARY)),
}


def declared_contract(loss_type: type) -> Contract | None:
    """The contract of ``loss_type`` or a class it derives from (None: the user's own)."""
    return next((CONTRACTS[cls] for cls in loss_type.__mro__ if cls in CONTRACTS), None)


def contract_of(loss: Any) -> Contract:
    """The declared contract of ``loss``; a loss of the user's takes logits and labels."""
    return declared_contract(type(loss)) or Contract(
        getattr(loss, "__name__", type(loss).__name__))


def misfit(loss_type: type, name: str, task: str, num_classes: int) -> str | None:
    """Why a loss of ``loss_type`` cannot train on ``task`` (None: it can, as far as its
    declared contract says). Needs the config alone: a sweep checks every job with it."""
    kind = task_kind(task, num_classes)
    contract = declared_contract(loss_type)
    if contract is None or kind in contract.kinds:
        return None
    return f"loss={name} does not fit {_described(task, num_classes)} ({kind}); {_fits(kind)}"


def _described(task: str, num_classes: int) -> str:
    return f"data.task={task} with {num_classes} class{'es' * (num_classes > 1)}"


def _fits(kind: str) -> str:
    return f"losses that fit: {', '.join(fitting(kind))}"


def fitting(kind: str) -> list[str]:
    """The ``loss=`` options that train on a task of ``kind``."""
    return [contract.name for contract in CONTRACTS.values() if kind in contract.kinds]


def task_kind(task: str, num_classes: int) -> str:
    if task not in (CLASSIFICATION, SEGMENTATION):
        raise TrainlabError(f"data.task={task!r}; choose 'classification' or 'segmentation'")
    if task == SEGMENTATION and num_classes == 1:
        return BINARY
    if num_classes < 2:
        raise TrainlabError(f"data.num_classes={num_classes} for {task}; choose 2 or more "
                            "(num_classes: 1 means binary, for segmentation masks)")
    return task


class ModelOutputLoss(nn.Module):
    """Feeds ``loss`` what its contract takes: the activation of the model's logits and the
    targets encoded as it wants them. Computed in float32 outside autocast, where
    probabilities and their logarithms keep their precision."""

    def __init__(self, loss: nn.Module, contract: Contract, num_classes: int) -> None:
        super().__init__()
        self.loss, self.contract, self.num_classes = loss, contract, num_classes

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        binary = self.num_classes == 1
        with torch.autocast(logits.device.type, enabled=False):
            outputs = logits.float()
            if self.contract.takes == "log_probs":
                outputs = F.logsigmoid(outputs) if binary else F.log_softmax(outputs, dim=1)
            elif self.contract.takes == "probs":
                outputs = torch.sigmoid(outputs) if binary else torch.softmax(outputs, dim=1)
            if self.contract.targets == "dense":
                if binary:
                    targets = targets.to(outputs.dtype).reshape(outputs.shape)
                else:
                    targets = F.one_hot(targets.long(), self.num_classes).movedim(-1, 1)
                    targets = targets.to(outputs.dtype)
            return self.loss(outputs, targets)


# ------------------------------------------------------------------ building and checking
def build_loss(node: DictConfig, choice: str | None, data: DictConfig) -> Any:
    """Build the loss of config ``node`` for ``data``'s task and check it on a tiny batch.

    Lists under ``weight``/``pos_weight`` become tensors. A loss whose contract does not
    fit the task (``dice`` on class labels, ``ce`` on one-channel masks), or whose class
    weights have the wrong length, fails here in one line naming the losses that fit.
    """
    options = OmegaConf.to_container(node, resolve=True)
    if options.get("ignore_index", 0) is None and str(options.get("_target_")).startswith("torch."):
        del options["ignore_index"]  # data without one: torch's own default (-100)
    tensors = {
        key: torch.as_tensor(options.pop(key), dtype=torch.float)
        for key in TENSOR_ARGS if isinstance(options.get(key), list)
    }
    loss = build(OmegaConf.create(options), "loss", choice, **tensors)
    num_classes = int(data.num_classes)
    kind = task_kind(data.task, num_classes)
    name = choice or str(node.get("_target_"))
    contract = contract_of(loss)
    described, fits = _described(data.task, num_classes), _fits(kind)
    problem = misfit(type(loss), name, data.task, num_classes)
    if problem:
        raise TrainlabError(problem)
    if contract.targets == "dense" and data.get("ignore_index") is not None:
        labelled = [c.name for c in CONTRACTS.values()
                    if kind in c.kinds and c.targets == "indices"]
        raise TrainlabError(
            f"loss={name} compares whole masks and cannot leave out data.ignore_index="
            f"{data.ignore_index} pixels; losses that can: {', '.join(labelled)}"
        )
    _check_class_weights(loss, name, num_classes, described)
    if contract.takes != "logits" or contract.targets != "indices":
        loss = ModelOutputLoss(loss, contract, num_classes)
    if declared_contract(type(loss)) is None:  # ours to find out whether it fits
        check_loss(loss, name, kind, num_classes, f"does not fit {described}; {fits}")
    else:  # it fits the task: a failure comes from its arguments
        arguments = ", ".join(f"loss.{key}={value}" for key, value in options.items()
                              if not key.startswith("_") and value is not None) or "none set"
        check_loss(loss, name, kind, num_classes,
                   f"fails on {described} with its arguments ({arguments})")
    return loss


def _check_class_weights(loss: Any, name: str, num_classes: int, described: str) -> None:
    """``weight``/``pos_weight``/``alpha``: one number, or one per class (per output channel)."""
    for key in (*TENSOR_ARGS, "alpha"):
        value = getattr(loss, key, None)
        if isinstance(value, torch.Tensor) and value.numel() not in (1, num_classes):
            raise TrainlabError(
                f"loss={name}: {key} has {value.numel()} values but {described} needs "
                f"{num_classes} (one per class) or one number"
            )


def check_loss(loss: Any, name: str, kind: str, num_classes: int, context: str) -> None:
    """Run ``loss`` on random logits and targets shaped as ``kind``'s data gives them."""
    n = num_classes + 2  # a batch size that cannot be mistaken for the class count
    if kind == CLASSIFICATION:
        logits, targets = torch.randn(n, num_classes), torch.randint(0, num_classes, (n,))
    else:
        logits = torch.randn(n, num_classes, 3, 3)
        targets = torch.randint(0, max(num_classes, 2), (n, 3, 3))
    try:
        value = loss(logits, targets)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainlabError(f"loss={name} {context}: {first}") from err
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise TrainlabError(
            f"loss={name} must return one number per batch; set its reduction to 'mean' or 'sum'"
        )
