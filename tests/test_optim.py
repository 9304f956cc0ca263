"""Optimizers from config: param groups for fine-tuning, no decay on norms/biases, frozen params."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainlab.errors import TrainlabError
from trainlab.optim import build_optimizer

OPTIONS = ["sgd", "adam", "adamw", "rmsprop", "adagrad"]


def finetune_model() -> nn.Module:
    """A frozen stem, a trainable conv + batch norm body, and a linear classifier head."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(1, 4, 3, padding=1))
    model.add_module("body", nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                           nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                                           nn.Flatten()))
    model.add_module("classifier", nn.Linear(4, 3))
    model.stem.requires_grad_(False)
    return model


def groups_by_name(optimizer):
    return {group["name"]: group for group in optimizer.param_groups}


@pytest.mark.parametrize("option", OPTIONS)
def test_every_optimizer_trains_only_unfrozen_parameters(compose, option):
    model = finetune_model()
    cfg = compose(f"optimizer={option}", "optimizer.head_lr=0.5", "optimizer.weight_decay=0.01",
                  "optimizer.no_decay_norm_bias=true")
    optimizer = build_optimizer(cfg.optimizer, model, option)
    handed = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert handed == {id(p) for p in model.parameters() if p.requires_grad}
    groups = groups_by_name(optimizer)
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert groups["head"]["lr"] == 0.5 and groups["backbone"]["lr"] == cfg.optimizer.lr
    assert groups["head"]["params"] == [model.classifier.weight]
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert groups["backbone"]["weight_decay"] == 0.01
    no_decay = {id(p) for p in groups["backbone_no_decay"]["params"]}
    assert no_decay == {id(model.body[0].bias), id(model.body[2].weight), id(model.body[2].bias)}

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    (model(torch.randn(2, 1, 5, 5)) ** 2).sum().backward()
    optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p)
        assert changed == p.requires_grad, name


def test_one_group_by_default(compose):
    optimizer = build_optimizer(compose("optimizer=sgd").optimizer, finetune_model(), "sgd")
    assert [g["name"] for g in optimizer.param_groups] == ["backbone"]
    assert optimizer.defaults["momentum"] == 0.9


def test_head_patterns_that_match_nothing_are_reported(compose):
    cfg = compose("optimizer.head_lr=0.1", "optimizer.head=[fc.*]")
    with pytest.raises(TrainlabError) as err:
        build_optimizer(cfg.optimizer, finetune_model(), "adam")
    assert "optimizer.head=['fc.*'] matches no trainable parameter" in str(err.value)
    assert "['body', 'classifier']" in str(err.value)  # the frozen stem is not offered


def test_all_frozen_is_an_error(compose):
    model = finetune_model().requires_grad_(False)
    with pytest.raises(TrainlabError, match="no trainable parameters"):
        build_optimizer(compose().optimizer, model, "adam")


def test_layer_decay_gives_each_block_a_lower_lr_through_the_loop(compose, tmp_path):
    """timm's grouping: the head at lr, each stage before it layer_decay times lower; onecycle
    keeps the ratios and the loop trains every group."""
    from trainlab.checkpoint import load_checkpoint
    from trainlab.tracker import NullTracker
    from trainlab.train import fit

    cfg = compose("model=timm", "model.name=test_resnet", "optimizer.layer_decay=0.5",
                  "optimizer.weight_decay=0.01", "optimizer.no_decay_norm_bias=true",
                  "trainer.max_epochs=1", "trainer.progress_bar=false")
    fit(cfg, NullTracker.like(cfg.logger), tmp_path, {})
    groups = load_checkpoint(tmp_path / "checkpoints/last.pt")["optimizer"]["param_groups"]
    lrs = {group["name"]: group["lr"] for group in groups}
    decayed = sorted((name for name in lrs if not name.endswith("_no_decay")),
                     key=lambda name: int(name[5:]))
    assert len(decayed) >= 3
    for lower, higher in zip(decayed, decayed[1:], strict=False):
        assert lrs[lower] == pytest.approx(0.5 * lrs[higher])
    assert lrs[decayed[-1]] == pytest.approx(cfg.optimizer.lr)
    assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith("_no_decay"))


def test_layer_decay_needs_a_model_timm_can_group(compose):
    from trainlab.models.finetune import build_model

    cfg = compose("model=mlp", "optimizer.layer_decay=0.7")
    model, _ = build_model(cfg.model, "mlp")
    with pytest.raises(TrainlabError, match="^optimizer.layer_decay needs a model with stages"):
        build_optimizer(cfg.optimizer, model, "adam")
