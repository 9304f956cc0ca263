"""Every config group option composes and builds; bad choices fail with clear messages."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import QUICK
from trainlab.components import build
from trainlab.errors import TrainlabError
from trainlab.models.finetune import build_model

GROUP_OPTIONS = {
    "model": ["cnn", "mlp"],
    "optimizer": ["adam", "sgd"],
    "scheduler": ["none", "steplr"],
}


@pytest.mark.parametrize("model", GROUP_OPTIONS["model"])
def test_models_are_sized_from_the_data(compose, model):
    cfg = compose(f"model={model}")
    net, _ = build_model(cfg.model)  # the fine-tune keys are not constructor arguments
    logits = net(torch.zeros(4, cfg.data.in_channels, *cfg.data.image_size))
    assert logits.shape == (4, cfg.data.num_classes)


@pytest.mark.parametrize("optimizer", GROUP_OPTIONS["optimizer"])
@pytest.mark.parametrize("scheduler", GROUP_OPTIONS["scheduler"])
def test_optimizer_and_scheduler_build_from_partials(compose, optimizer, scheduler):
    from trainlab.optim import build_optimizer
    from trainlab.schedulers import build_scheduler

    cfg = compose(f"optimizer={optimizer}", f"scheduler={scheduler}")
    opt = build_optimizer(cfg.optimizer, torch.nn.Linear(2, 2))
    assert opt.param_groups[0]["lr"] == cfg.optimizer.lr
    sched = build_scheduler(cfg.scheduler, opt)
    assert (sched is None) == (scheduler == "none")


def test_experiment_preset_is_on_the_search_path(compose):
    cfg = compose("experiment=digits_cnn")
    assert cfg.scheduler._target_.endswith("StepLR")
    assert cfg.logger.experiment_name == "digits_cnn"


def test_digits_split_is_seeded_and_disjoint(compose):
    cfg = compose()
    first, again = build(cfg.data.dataset, "data"), build(cfg.data.dataset, "data")
    assert torch.equal(first.train.tensors[0], again.train.tensors[0])
    assert len(first.train) + len(first.val) == 1797
    other = build(compose("seed=7").data.dataset, "data")
    assert not torch.equal(first.val.tensors[1], other.val.tensors[1])


def test_unimportable_target_names_the_config_file(compose):
    cfg = compose("loss._target_=torch.nn.NoSuchLoss")
    expected = r"conf/loss/ce\.yaml: _target_ 'torch\.nn\.NoSuchLoss'"
    with pytest.raises(TrainlabError, match=expected):
        build(cfg.loss, "loss", "ce")


@pytest.mark.no_store
@pytest.mark.parametrize("command", ["train", "preview", "lr-plot"])
def test_a_misspelt_group_option_is_one_line_naming_the_close_ones(trainlab_in_process,
                                                                   tmp_path, command):
    proc = trainlab_in_process(command, "loss=dcie", check=False)
    assert proc.returncode == 1
    assert proc.stderr == (
        "error: loss=dcie: no loss/dcie.yaml on the config search path; did you mean dice or "
        "ce? loss options: bce, bce_logits, ce, dice, dice_bce, focal, huber, iou, kl_div, l1, "
        "mse, nll, smooth_l1, tversky\n")
    assert not any(tmp_path.iterdir())  # no store, no output folder


def test_bad_target_is_one_line_not_a_traceback(trainlab_in_process):
    proc = trainlab_in_process("train", "loss._target_=torch.nn.NoSuchLoss", *QUICK, check=False)
    assert proc.returncode == 1
    assert "conf/loss/ce.yaml: _target_ 'torch.nn.NoSuchLoss' cannot be imported" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_groups(trainlab_in_process):
    proc = trainlab_in_process("train", "--help")
    assert "loss: bce, bce_logits, ce," in proc.stdout
    assert "model: cnn, mlp, timm, torchvision, unet\n" in proc.stdout
    assert "model/finetune" not in proc.stdout  # the shared fine-tune keys are no model


def test_every_model_takes_the_shared_finetune_keys(compose):
    for model in ("cnn", "mlp", "timm", "torchvision", "unet"):
        assert compose(f"model={model}", "model.freeze=backbone").model.freeze == "backbone"


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["--help"], "usage: trainlab COMMAND"),
     (["train", "--cfg", "job"], "_target_: trainlab.runner.Runner")],
)
def test_help_and_printing_the_config_do_not_import_torch_or_mlflow(tmp_path, args, expected):
    probe = (
        f"import sys; from trainlab.cli import main; main({args!r}); "
        "heavy = [m for m in ('torch', 'mlflow') if m in sys.modules]; "
        "print('HEAVY', heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert expected in proc.stdout
    assert "HEAVY []" in proc.stdout

