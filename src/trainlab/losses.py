"""Losses for segmentation and imbalance, and the check that a loss fits the data's task.

Each of ours works in two forms, chosen by the shape of the model's output:
binary (one output channel, or outputs shaped like the targets: sigmoid) and multi-class
(C channels: softmax over channels, targets are class indices). Outputs are (N, C, *) —
(N, C) for classification, (N, C, H, W) for segmentation — and targets (N, *).
Region losses (dice, iou, tversky) sum over the batch and all pixels per class, then
reduce over classes; ``ignore_index`` pixels take no part in any sum.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trainlab.components import build
from trainlab.errors import TrainlabError

REDUCTIONS = ("mean", "sum", "none")
# torch losses that want float targets shaped like the outputs, never class indices
FLOAT_TARGET_LOSSES = (
    nn.BCELoss, nn.BCEWithLogitsLoss, nn.L1Loss, nn.MSELoss, nn.SmoothL1Loss, nn.HuberLoss,
    nn.KLDivLoss,
)
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
    multi-class → one weight per class (a list). ``None`` weighs all alike.
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


# ------------------------------------------------------------------ building and checking
FITTING = {
    "classification": "ce, nll, focal",
    "segmentation": "ce, nll, dice, dice_bce, iou, focal, tversky",
    "binary segmentation": "bce_logits, bce, dice, dice_bce, iou, focal, tversky",
}


class MaskAsFloatTarget(nn.Module):
    """Torch's element-wise losses want float targets shaped like the outputs; binary
    segmentation data gives integer masks (N, H, W): cast and reshape them on the way in."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, targets.to(logits.dtype).reshape(logits.shape))


def build_loss(node: DictConfig, choice: str | None, data: DictConfig) -> Any:
    """Build the loss of config ``node`` and check it on a tiny batch shaped like ``data``'s.

    Lists under ``weight``/``pos_weight`` become tensors. A loss that cannot take this task's
    outputs and targets (``bce`` on class labels, class weights of the wrong length) fails
    here, before any training step, with the losses that fit.
    """
    options = OmegaConf.to_container(node, resolve=True)
    if "ignore_index" in options and options["ignore_index"] is None:
        del options["ignore_index"]  # data.ignore_index unset: the loss's own default (torch: -100)
    tensors = {
        key: torch.as_tensor(options.pop(key), dtype=torch.float)
        for key in TENSOR_ARGS if isinstance(options.get(key), list)
    }
    loss = build(OmegaConf.create(options), "loss", choice, **tensors)
    binary_masks = data.task == "segmentation" and int(data.num_classes) == 1
    if binary_masks and isinstance(loss, FLOAT_TARGET_LOSSES):
        loss = MaskAsFloatTarget(loss)
    check_loss(loss, choice or str(node.get("_target_")), data.task, int(data.num_classes))
    return loss


def check_loss(loss: Any, name: str, task: str, num_classes: int) -> None:
    """Run ``loss`` on random outputs and targets of ``task``; raise a clear error if it fails."""
    if task not in ("classification", "segmentation"):
        raise TrainlabError(
            f"data.task={task!r}; choose 'classification' or 'segmentation'"
        )
    kind = "binary segmentation" if task == "segmentation" and num_classes == 1 else task
    n = num_classes + 2  # a batch size that cannot be mistaken for the class count
    shape = (n,) if task == "classification" else (n, 3, 3)
    if kind == "binary segmentation":
        logits, targets = torch.randn(n, 1, 3, 3), torch.randint(0, 2, (n, 3, 3))  # as data gives
    else:
        logits, targets = torch.randn(n, num_classes, *shape[1:]), torch.randint(
            0, num_classes, shape
        )
    described = f"data.task={task} with {num_classes} classes"
    fits = f"losses that fit: {FITTING[kind]}"
    if kind == "binary segmentation" and isinstance(loss, nn.CrossEntropyLoss | nn.NLLLoss):
        fits += "; or set data.num_classes=2 for two-class masks with one logit per class"
    if kind != "binary segmentation" and isinstance(loss, FLOAT_TARGET_LOSSES):
        raise TrainlabError(
            f"loss={name} ({type(loss).__name__}) wants float targets shaped like the outputs, "
            f"but {described} gives integer class labels; {fits}"
        )
    weight = getattr(loss, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.numel() not in (1, num_classes):
        raise TrainlabError(
            f"loss={name}: weight has {weight.numel()} values but {described} needs "
            f"{num_classes} (one per class)"
        )
    core = loss.loss if isinstance(loss, MaskAsFloatTarget) else loss
    if isinstance(core, nn.NLLLoss):
        logits = torch.log_softmax(logits, dim=1)  # NLL takes log-probabilities
    elif isinstance(core, nn.BCELoss):
        logits = torch.sigmoid(logits)  # BCE takes probabilities
    try:
        value = loss(logits, targets)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        raise TrainlabError(f"loss={name} does not fit {described}: {err}; {fits}") from err
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise TrainlabError(
            f"loss={name} must return one number per batch; set its reduction to 'mean' or 'sum'"
        )
