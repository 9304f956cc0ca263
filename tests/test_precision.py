"""Precision modes, gradient clipping and accumulation on a real runner built from the config."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import FAST
from trainlab.errors import TrainlabError
from trainlab.precision import Precision
from trainlab.seeding import seed_everything
from trainlab.tracker import NullTracker
from trainlab.train import fit


class AfterFirstEpoch:
    """Epoch-end callback: snapshots the weights after epoch 1 and records the dtypes the
    model's forward returns from then on."""

    def __init__(self):
        self.weights = None
        self.dtypes = set()

    def on_epoch_end(self, runner, epoch, metrics):
        if epoch == 0:
            self.weights = flat(runner.model.state_dict())
            runner.model.register_forward_hook(lambda _m, _i, out: self.dtypes.add(out.dtype))


def flat(state):
    return torch.cat([w.detach().flatten().cpu() for w in state.values()])


def train(compose, out, *overrides):
    cfg = compose(*FAST, *overrides)
    seed_everything(int(cfg.seed))
    watch = AfterFirstEpoch()
    result = fit(cfg, NullTracker.like(cfg.logger), out, {}, callbacks=[watch])
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    return result, watch, last


def test_fp16_on_cpu_is_refused_with_a_hint_to_bf16(compose, tmp_path):
    with pytest.raises(TrainlabError, match="precision=fp16 needs a GPU.*precision=bf16"):
        train(compose, tmp_path, "precision=fp16", "trainer.max_epochs=1")


def test_bf16_autocasts_the_forward_on_cpu_and_still_learns(compose, tmp_path):
    result, watch, last = train(compose, tmp_path, "precision=bf16", "trainer.max_epochs=3")
    assert watch.dtypes == {torch.bfloat16}
    assert result.history[-1]["train/loss_epoch"] < result.history[0]["train/loss_epoch"]
    assert result.best > 0.5
    assert all(w.dtype == torch.float32 for w in last.values()), "weights stay float32"


def test_gradient_clipping_bounds_every_update(compose, tmp_path):
    sgd = ["optimizer=sgd", "optimizer.lr=1.0", "optimizer.momentum=0.0", "trainer.max_epochs=2"]
    _, free, free_last = train(compose, tmp_path / "free", *sgd)
    _, clipped, clipped_last = train(
        compose, tmp_path / "clipped", *sgd, "trainer.gradient_clip_val=0.001"
    )
    steps = -(-1438 // 64)  # optimizer steps in epoch 2, each moving at most lr * 0.001
    moved_clipped = (flat(clipped_last) - clipped.weights).norm()
    assert 0 < moved_clipped <= steps * 0.001 * 1.001
    assert (flat(free_last) - free.weights).norm() > 10 * moved_clipped


def test_accumulating_two_half_batches_equals_one_full_batch(compose, tmp_path):
    common = ["optimizer=sgd", "optimizer.lr=0.1", "trainer.max_epochs=2", "data.drop_last=true"]
    _, full, full_last = train(compose, tmp_path / "full", *common, "data.batch_size=64")
    _, _, accumulated_last = train(
        compose, tmp_path / "accum", *common, "data.batch_size=32",
        "trainer.accumulate_grad_batches=2",
    )
    assert torch.allclose(flat(full_last), flat(accumulated_last), atol=1e-5)
    assert not torch.allclose(flat(full_last), full.weights, atol=1e-3), "epoch 2 trained"


def test_skipped_loss_scaler_steps_report_false_so_schedulers_wait():
    precision = Precision("fp16")
    precision.scaler = torch.amp.GradScaler("cpu")  # the GPU scaler's logic, runnable here
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    precision.backward((weight * torch.tensor([1.0, float("inf")])).sum())
    assert precision.step(optimizer) is False
    assert torch.equal(weight.detach(), torch.ones(2)), "the skipped step left the weights"
    optimizer.zero_grad()
    precision.backward(weight.sum())
    assert precision.step(optimizer) is True
    assert not torch.equal(weight.detach(), torch.ones(2))


def test_unknown_precision_mode_names_the_choices():
    with pytest.raises(TrainlabError, match=r"precision.mode='fp8'.*fp32.*bf16"):
        Precision("fp8")


@pytest.mark.parametrize(("option", "mode", "tf32"),
                         [("fp32", "fp32", False), ("bf16", "bf16", False), ("tf32", "fp32", True)])
def test_precision_options_build_and_run_on_cpu(compose, option, mode, tf32):
    from hydra.utils import instantiate

    precision = instantiate(compose(f"precision={option}").precision)
    assert (precision.mode, precision.tf32) == (mode, tf32)
    precision.setup(torch.device("cpu"))
    with precision.autocast():
        out = torch.nn.Linear(4, 2)(torch.ones(1, 4))
    assert out.dtype == (torch.bfloat16 if mode == "bf16" else torch.float32)


def test_trainlab_train_refuses_fp16_on_cpu_before_torch_or_mlflow_loads(tmp_path):
    """The refusal is the first thing a user sees, within a second: it needs neither torch
    nor MLflow, and no store or run is created."""
    probe = ("import runpy, sys\n"
             "sys.argv = ['trainlab', 'train', 'precision=fp16']\n"
             "try:\n    runpy.run_module('trainlab.cli', run_name='__main__')\n"
             "except SystemExit as end:\n"
             "    print('exit', end.code, 'torch' in sys.modules, 'mlflow' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert "precision=fp16" in proc.stderr and "precision=bf16" in proc.stderr
    assert proc.stdout.split() == ["exit", "1", "False", "False"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
