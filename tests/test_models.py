"""Models and fine-tuning surgery: the course's nets, the zoos, weights files, freezing, init."""

from __future__ import annotations

import time

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from trainlab.errors import TrainlabError
from trainlab.models.finetune import build_model, finetune, load_weights, replace_head
from trainlab.models.unet import UNet


def model_node(compose, *overrides):
    return compose(*overrides).model


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("size", [(8, 8), (37, 50), (64, 64)])
def test_unet_keeps_any_input_size(bilinear, size):
    model = UNet(n_channels=3, n_classes=4, bilinear=bilinear, base_channels=4)
    assert model(torch.randn(2, 3, *size)).shape == (2, 4, *size)


def test_unet_takes_channels_and_classes_from_the_data_config(compose):
    cfg = compose("model=unet", "data.in_channels=3", "data.num_classes=5",
                  "model.base_channels=4")
    model, _ = build_model(cfg.model, "unet")
    assert model(torch.randn(1, 3, 20, 20)).shape == (1, 5, 20, 20)
    full = UNet(3, 1)  # the reference U-Net sizes: 31.0 M, 17.3 M parameters when bilinear
    assert sum(p.numel() for p in full.parameters()) == 31_037_633
    assert sum(p.numel() for p in UNet(3, 1, bilinear=True).parameters()) == 17_262_977


@pytest.mark.parametrize("zoo,name", [("timm", "test_resnet"), ("torchvision", "resnet18")])
def test_zoo_models_are_sized_from_the_data(compose, zoo, name):
    cfg = compose(f"model={zoo}", f"model.name={name}", "data.num_classes=7")
    model, _ = build_model(cfg.model, zoo)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)  # digits: 1 channel


@pytest.mark.parametrize("zoo", ["timm", "torchvision"])
def test_unknown_architecture_suggests_close_names(compose, zoo):
    cfg = compose(f"model={zoo}", "model.name=resnet-18")
    with pytest.raises(TrainlabError, match=r"resnet-18.*did you mean resnet18"):
        build_model(cfg.model, zoo)


@pytest.mark.parametrize("zoo", ["timm", "torchvision"])
def test_pretrained_without_network_fails_fast_naming_weights_path(compose, zoo):
    cfg = compose(f"model={zoo}", "model.pretrained=true")
    started = time.monotonic()
    with pytest.raises(TrainlabError, match=r"model\.weights_path"):
        build_model(cfg.model, zoo)
    assert time.monotonic() - started < 15


def test_models_command_lists_both_zoos_with_pretrained_flag(capsys):
    from trainlab.cli import main

    assert main(["models", "resnet1*"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:3] == ["torchvision", "resnet18", "pretrained"]
               for line in out.splitlines())
    assert any(line.split()[:2] == ["timm", "resnet10t"] for line in out.splitlines())


def _timm(num_classes=10):
    import timm

    return timm.create_model("test_resnet", num_classes=num_classes, in_chans=1)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_weights_file_with_wrapper_prefixes_and_another_head(tmp_path, prefix, caplog):
    source = _timm(num_classes=10)
    path = tmp_path / "weights.pt"
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, path)
    model = _timm(num_classes=3)
    caplog.set_level("INFO")
    report = load_weights(model, str(path))
    assert [name for name, _, _ in report.skipped] == ["fc.weight", "fc.bias"]
    assert "skipped (shape differs): fc.weight [10, " in report.summary()
    assert report.summary() in caplog.text
    for name, value in model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(value, source.state_dict()[name]), name


def test_trainlab_checkpoint_loads_through_the_config(compose, tmp_path):
    from trainlab.checkpoint import save_checkpoint

    source = _timm()
    save_checkpoint({"model": source.state_dict(), "epoch": 3}, tmp_path / "best.pt")
    cfg = compose("model=timm", "model.name=test_resnet",
                  f"model.weights_path={tmp_path / 'best.pt'}")
    model, _ = build_model(cfg.model, "timm")
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_weights_matching_nothing_and_non_checkpoints_are_errors(tmp_path):
    other = tmp_path / "other.pt"
    torch.save(nn.Linear(3, 2).state_dict(), other)
    with pytest.raises(TrainlabError, match="matches none of the model's"):
        load_weights(_timm(), str(other))
    junk = tmp_path / "notes.txt"
    junk.write_text("not a checkpoint")
    with pytest.raises(TrainlabError, match="notes.txt"):
        load_weights(_timm(), str(junk))
    torch.save({"epoch": 3}, tmp_path / "no_weights.pt")
    with pytest.raises(TrainlabError, match="no_weights.pt holds no model weights"):
        load_weights(_timm(), str(tmp_path / "no_weights.pt"))


def test_freeze_backbone_leaves_only_the_head_trainable_and_bn_in_eval():
    model, _ = finetune(_timm(), freeze="backbone", freeze_bn=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(torch.randn(8, 1, 16, 16))  # a training-mode forward: frozen BN statistics stay
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_freeze_by_name_patterns_and_bad_spec():
    model, _ = finetune(_timm(), freeze=["conv1.*", "bn1.*"])
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(name.startswith(("conv1.", "bn1.")) for name in frozen)
    with pytest.raises(TrainlabError, match="matches no parameter"):
        finetune(_timm(), freeze=["nothing.*"])
    with pytest.raises(TrainlabError, match="choose none, backbone"):
        finetune(_timm(), freeze="everything")


def test_mlp_head_and_torchvision_heads_are_replaced():
    model = _timm()
    replace_head(model, 4, hidden=16, dropout=0.5)
    assert [type(m) for m in model.fc] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 4)
    import torchvision.models as tvm

    for name in ("resnet18", "mobilenet_v3_small", "vit_b_16"):
        net = tvm.get_model(name)
        replace_head(net, 5)
        assert net.state_dict()[[k for k in net.state_dict() if k.endswith("weight")][-1]].shape[
            0] == 5, name


def test_init_applies_scheme_per_layer_type_but_not_to_pretrained_parts(compose):
    from trainlab.models.init import init_weights

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    assert init_weights(model, "xavier_uniform") == 3
    assert torch.all(model[0].bias == 0) and torch.all(model[1].weight == 1)
    assert model[3].weight.std() > 0
    with pytest.raises(TrainlabError, match="kaiming_normal"):
        init_weights(model, "he")
    pretrained = _timm()
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    finetune(pretrained, init="kaiming_normal", pretrained=True)
    changed = {k for k, v in pretrained.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc.weight", "fc.bias"}  # only the new head is initialised


def test_gradual_unfreeze_adds_new_params_to_the_optimizer():
    from types import SimpleNamespace

    model, callbacks = finetune(_timm(), freeze="backbone", freeze_bn=True, unfreeze_at_epoch=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    runner = SimpleNamespace(optimizer=optimizer, scheduler=None)
    (unfreeze,) = callbacks
    unfreeze.on_epoch_end(runner, 0, {})
    assert len(optimizer.param_groups) == 1
    unfreeze.on_epoch_end(runner, 1, {})
    assert all(p.requires_grad for p in model.parameters())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters()}
    assert optimizer.param_groups[1]["lr"] == 0.1
    assert isinstance(model.bn1, nn.BatchNorm2d)  # BatchNorm trains again


def test_channels_last_and_compile_switches():
    model, _ = finetune(_timm(), channels_last=True, compile=True)
    assert model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model._compiled_call_impl is not None  # compiled in place, on first call
    assert not any(name.startswith("_orig_mod.") for name in model.state_dict())


def test_finetune_keys_are_not_given_to_the_constructor(compose):
    cfg = compose("model=cnn", "model.init=kaiming_normal", "model.freeze=backbone")
    model, _ = build_model(cfg.model, "cnn")
    assert not any(p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert OmegaConf.select(cfg, "model.weights_path") is None


def test_head_and_freeze_patterns_from_the_command_line(compose):
    cfg = compose("model=timm", "model.name=test_resnet", "model.head={hidden:16,dropout:0.1}",
                  "model.freeze=[stem*,conv1.*]", "data.num_classes=3")
    model, _ = build_model(cfg.model, "timm")
    assert model.fc[0].out_features == 16 and model.fc[-1].out_features == 3
    assert not any(p.requires_grad for p in model.conv1.parameters())
    assert all(p.requires_grad for p in model.fc.parameters())


@pytest.mark.parametrize("overrides, classifier, kept", [
    (["model=cnn"], "classifier", [nn.Flatten]),
    (["model=torchvision", "model.name=mobilenet_v3_small"], "classifier", []),
])
def test_head_replaces_the_whole_classifier(compose, overrides, classifier, kept):
    cfg = compose(*overrides, "model.head={hidden:32,dropout:0.2}")
    model, _ = build_model(cfg.model, cfg.model._target_)
    head = model.get_submodule(classifier)
    assert [type(m) for m in head] == [*kept, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert head[-1].out_features == 10 and head[-4].out_features == 32
    images = torch.randn(2, 1, 8, 8) if "model=cnn" in overrides else torch.randn(2, 1, 32, 32)
    assert model.eval()(images).shape == (2, 10)


def test_a_new_head_trains_through_the_loop(compose, tmp_path):
    from trainlab.tracker import NullTracker
    from trainlab.train import fit

    cfg = compose("model=cnn", "model.head={hidden:32,dropout:0.1}", "trainer.max_epochs=2",
                  "trainer.progress_bar=false")
    result = fit(cfg, NullTracker.like(cfg.logger), tmp_path, {})
    assert result.history[-1]["val/acc"] > 0.5


def test_fixed_size_zoo_models_get_the_datas_image_size(compose, tmp_path):
    """A timm ViT trains on 32×32 images without a hand-added img_size."""
    import numpy as np
    from PIL import Image

    from trainlab.tracker import NullTracker
    from trainlab.train import fit

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(
                tmp_path / "imgs" / label / f"{i}.png")
    cfg = compose("data=image_folder", f"data.dataset.root={tmp_path / 'imgs'}",
                  "data.num_classes=2", "data.image_size=[32,32]", "data.num_workers=0",
                  "data.persistent_workers=false", "data.pin_memory=false",
                  "model=timm", "model.name=test_vit", "trainer.max_epochs=1",
                  "trainer.progress_bar=false")
    result = fit(cfg, NullTracker.like(cfg.logger), tmp_path / "run", {})
    assert 0 <= result.history[-1]["val/acc"] <= 1


def test_models_lists_only_what_model_can_train(capsys, compose):
    from trainlab.models.zoo import models_cli

    assert models_cli(["*rcnn*", "*resnet18*"]) == 0
    listed = capsys.readouterr().out
    assert "torchvision  resnet18 " in listed and "timm         resnet18 " in listed
    assert "rcnn" not in listed  # torchvision's detection networks are not classifiers
    cfg = compose("model=torchvision", "model.name=fasterrcnn_resnet50_fpn")
    with pytest.raises(TrainlabError, match="^model.name='fasterrcnn_resnet50_fpn' is not an "
                                            "image classifier"):
        build_model(cfg.model, "torchvision")


def test_a_zoo_model_that_cannot_take_the_data_size_is_one_line_before_any_run(compose,
                                                                               tmp_path):
    """`model=torchvision model.name=vit_b_16` on 8×8 digits: refused while building, naming
    the model, the data's size and what would fit; a size its patches tile builds."""
    from omegaconf import OmegaConf

    from trainlab.errors import TrainlabError
    from trainlab.models.zoo import torchvision_model

    cfg = compose("model=torchvision", "model.name=vit_b_16")
    with pytest.raises(TrainlabError, match=r"vit_b_16 cannot take the data's image size "
                                            r"8×8 .*data\.image_size"):
        torchvision_model(name="vit_b_16", num_classes=10, in_channels=1,
                          image_size=cfg.data.image_size)
    model = torchvision_model(name="vit_b_16", num_classes=10,
                              image_size=OmegaConf.create([32, 32]))
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
