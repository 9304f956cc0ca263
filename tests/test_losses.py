"""Our segmentation/imbalance losses against independent NumPy formulas, and task checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from trainlab.errors import TrainlabError
from trainlab.losses import DiceBCELoss, DiceLoss, FocalLoss, IoULoss, TverskyLoss, build_loss

OURS = {"dice": DiceLoss, "iou": IoULoss, "tversky": TverskyLoss, "focal": FocalLoss,
        "dice_bce": DiceBCELoss}


# ---------------------------------------------------------------- independent references
def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def per_pixel(logits: np.ndarray, targets: np.ndarray, ignore=None):
    """Rows of (class probabilities, one-hot target) for every kept pixel."""
    if logits.ndim == targets.ndim or logits.shape[1] == 1:  # binary
        p = 1 / (1 + np.exp(-logits.reshape(-1)))
        t = targets.reshape(-1).astype(float)
        keep = t != ignore if ignore is not None else np.ones_like(t, bool)
        return np.stack([p[keep]], 1), np.stack([t[keep]], 1)
    c = logits.shape[1]
    p = np.moveaxis(softmax(logits), 1, -1).reshape(-1, c)
    t = targets.reshape(-1)
    keep = t != ignore if ignore is not None else np.ones_like(t, bool)
    return p[keep], np.eye(c)[t[keep]]


def ref_region(kind, logits, targets, smooth=1.0, alpha=0.5, beta=0.5, ignore=None):
    p, t = per_pixel(logits, targets, ignore)
    tp, fp, fn = (p * t).sum(0), (p * (1 - t)).sum(0), ((1 - p) * t).sum(0)
    score = {
        "dice": (2 * tp + smooth) / (2 * tp + fp + fn + smooth),
        "iou": (tp + smooth) / (tp + fp + fn + smooth),
        "tversky": (tp + smooth) / (tp + alpha * fp + beta * fn + smooth),
    }[kind]
    return (1 - score).mean()


def ref_focal(logits, targets, gamma=2.0, alpha=None, ignore=None):
    p, t = per_pixel(logits, targets, ignore)
    if p.shape[1] == 1:  # binary: p_t of the true label, alpha for positives
        p_t = np.where(t[:, 0] == 1, p[:, 0], 1 - p[:, 0])
        a = 1.0 if alpha is None else np.where(t[:, 0] == 1, alpha, 1 - alpha)
    else:
        p_t = (p * t).sum(1)
        a = 1.0 if alpha is None else (np.asarray(alpha) * t).sum(1)
    return np.mean(-a * (1 - p_t) ** gamma * np.log(p_t))


def ref_ce(logits, targets, ignore=None):
    return ref_focal(logits, targets, gamma=0.0, ignore=ignore)


def ours(name, **kwargs):
    return {"dice_bce": lambda: DiceBCELoss(**kwargs)}.get(name, lambda: OURS[name](**kwargs))()


def reference(name, logits, targets, ignore=None, **kwargs):
    if name == "focal":
        return ref_focal(logits, targets, ignore=ignore, **kwargs)
    if name == "dice_bce":
        return ref_ce(logits, targets, ignore) + ref_region("dice", logits, targets, ignore=ignore)
    return ref_region(name, logits, targets, ignore=ignore, **kwargs)


# ------------------------------------------------------------------------------- fixtures
def multiclass(seed=0, n=2, c=3, h=4, w=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g), torch.randint(0, c, (n, h, w), generator=g)


def binary(seed=0, n=2, h=4, w=5, channel=True):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, h, w) if channel else (n, h, w)
    return torch.randn(*shape, generator=g), torch.randint(0, 2, shape, generator=g).float()


EXTRA = {"tversky": {"alpha": 0.3, "beta": 0.7}, "focal": {"gamma": 2.0}}


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("form", ["multiclass", "binary_nchw", "binary_nhw"])
def test_matches_independent_formula(name, form):
    logits, targets = (
        multiclass() if form == "multiclass" else binary(channel=form == "binary_nchw")
    )
    got = ours(name, **EXTRA.get(name, {}))(logits, targets)
    want = reference(name, logits.numpy(), targets.numpy().astype(int), **EXTRA.get(name, {}))
    assert got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name", ["dice", "iou", "tversky", "focal", "dice_bce"])
def test_perfect_prediction_is_zero(name):
    targets = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    logits = 30.0 * torch.nn.functional.one_hot(targets, 3).permute(0, 3, 1, 2).float()
    assert ours(name)(logits, targets).item() == pytest.approx(0.0, abs=1e-6)


def test_known_binary_values():
    """Hand-computed: p = (.8, .4, .1, .9), t = (1, 0, 0, 1): TP 1.7, FP 0.5, FN 0.3."""
    p = torch.tensor([0.8, 0.4, 0.1, 0.9])
    logits, targets = torch.log(p / (1 - p)).reshape(1, 1, 2, 2), torch.tensor(
        [1.0, 0, 0, 1]).reshape(1, 1, 2, 2)
    assert DiceLoss(smooth=0)(logits, targets).item() == pytest.approx(1 - 3.4 / 4.2)
    assert IoULoss(smooth=0)(logits, targets).item() == pytest.approx(1 - 1.7 / 2.5)
    tversky = TverskyLoss(alpha=0.3, beta=0.7, smooth=0)(logits, targets).item()
    assert tversky == pytest.approx(1 - 1.7 / (1.7 + 0.15 + 0.21))
    # focal per element, then mean: -(1 - p_t)^2 log p_t with p_t = (.8, .6, .9, .9)
    p_t = np.array([0.8, 0.6, 0.9, 0.9])
    assert FocalLoss(gamma=2)(logits, targets).item() == pytest.approx(
        np.mean(-((1 - p_t) ** 2) * np.log(p_t)), rel=1e-5)


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, targets = multiclass(seed=3)
    assert FocalLoss(gamma=0)(logits, targets).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)
    alpha = [0.2, 0.3, 0.5]
    got = FocalLoss(alpha=alpha, gamma=1.5)(logits, targets).item()
    assert got == pytest.approx(ref_focal(logits.numpy(), targets.numpy(), 1.5, alpha), rel=1e-5)


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("form", ["multiclass", "binary"])
def test_ignore_index_pixels_count_for_nothing(name, form):
    logits, targets = multiclass(seed=4) if form == "multiclass" else binary(seed=4)
    ignored = torch.zeros_like(targets, dtype=torch.bool)
    ignored[..., :2, :] = True
    masked = torch.where(ignored, torch.full_like(targets, 255), targets)
    got = ours(name, ignore_index=255)(logits, masked).item()
    want = reference(name, logits.numpy(), masked.numpy().astype(int), ignore=255)
    assert got == pytest.approx(want, rel=1e-5)
    # and the ignored pixels' logits do not matter at all
    noisy = logits + 5 * ignored.unsqueeze(1).float() if form == "multiclass" else logits + 5 * (
        ignored.float())
    assert ours(name, ignore_index=255)(noisy, masked).item() == pytest.approx(got, rel=1e-6)


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("form", ["multiclass", "binary"])
def test_gradcheck_float64(name, form):
    logits, targets = multiclass(n=1, h=2, w=3) if form == "multiclass" else binary(n=1, h=2, w=3)
    logits = logits.double().requires_grad_()
    loss = ours(name)
    assert torch.autograd.gradcheck(lambda x: loss(x, targets), (logits,))


def test_reduction_none_gives_one_value_per_class():
    logits, targets = multiclass()
    assert DiceLoss(reduction="none")(logits, targets).shape == (3,)
    assert FocalLoss(reduction="none")(logits, targets).shape == targets.shape


def data(task="classification", num_classes=10):
    return OmegaConf.create({"task": task, "num_classes": num_classes})


@pytest.mark.parametrize(
    "name, task, classes",
    [("ce", "classification", 10), ("nll", "classification", 10), ("focal", "classification", 10),
     ("bce", "segmentation", 1), ("bce_logits", "segmentation", 1), ("mse", "classification", 10),
     ("kl_div", "segmentation", 4),
     *[(name, "segmentation", 4) for name in OURS], *[(name, "segmentation", 1) for name in OURS]],
)
def test_loss_option_builds_for_a_task_it_fits(compose, name, task, classes):
    loss = build_loss(compose(f"loss={name}").loss, name, data(task, classes))
    g = torch.Generator().manual_seed(0)
    if task == "classification":
        targets = torch.randint(0, classes, (6,), generator=g)
        perfect = torch.nn.functional.one_hot(targets, classes).float()
    elif classes == 1:
        targets = torch.randint(0, 2, (6, 5, 5), generator=g)
        perfect = targets.unsqueeze(1).float()
    else:
        targets = torch.randint(0, classes, (6, 5, 5), generator=g)
        perfect = torch.nn.functional.one_hot(targets, classes).permute(0, 3, 1, 2).float()
    guess = torch.randn(perfect.shape, generator=g)
    if name == "bce":  # BCELoss takes probabilities, the others logits
        guess, perfect = guess.sigmoid(), perfect.clamp(1e-4, 1 - 1e-4)
    else:
        perfect = 20 * (2 * perfect - 1)
    scored = loss(guess, targets)
    assert scored.dim() == 0 and torch.isfinite(scored)
    assert loss(perfect, targets).item() < scored.item()  # it rewards the right answer


def test_a_loss_gets_what_its_contract_takes_from_the_logits():
    """nll gets log-probabilities, bce probabilities and one-hot targets; the model's
    logits stay logits for metrics and predictions."""
    import torch.nn.functional as F

    logits, targets = torch.randn(6, 4), torch.randint(0, 4, (6,))
    nll = build_loss(OmegaConf.create({"_target_": "torch.nn.NLLLoss"}), "nll", data(num_classes=4))
    assert nll(logits, targets).item() == pytest.approx(F.cross_entropy(logits, targets).item())
    bce = build_loss(OmegaConf.create({"_target_": "torch.nn.BCELoss"}), "bce", data(num_classes=4))
    want = F.binary_cross_entropy(logits.softmax(1), F.one_hot(targets, 4).float())
    assert bce(logits, targets).item() == pytest.approx(want.item(), rel=1e-6)


def test_bce_on_one_channel_masks_matches_bce_with_logits():
    logits, masks = torch.randn(2, 1, 3, 3), torch.randint(0, 2, (2, 3, 3))
    bce = build_loss(OmegaConf.create({"_target_": "torch.nn.BCELoss"}), "bce",
                     data("segmentation", 1))
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], masks.float())
    assert bce(logits, masks).item() == pytest.approx(want.item(), rel=1e-5)


def test_class_weights_become_a_tensor_and_must_have_one_value_per_class(compose):
    loss = build_loss(compose("loss=ce", f"loss.weight={[1.0] * 10}").loss, "ce", data())
    assert torch.equal(loss.weight, torch.ones(10))
    with pytest.raises(TrainlabError, match="weight has 3 values but .* needs 10"):
        build_loss(compose("loss=ce", "loss.weight=[1,2,3]").loss, "ce", data())


def test_a_users_plain_function_is_a_loss():
    """What a user's conf/loss/my_loss.yaml holds: a function and its fixed arguments."""
    node = OmegaConf.create({"_target_": "torch.nn.functional.cross_entropy",
                             "_partial_": True, "label_smoothing": 0.1})
    loss = build_loss(node, "my_loss", data())
    logits, targets = torch.randn(4, 10), torch.randint(0, 10, (4,))
    assert loss(logits, targets).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1).item())
