"""The order of a run: check the config → build and try one batch → resume check → open the
MLflow run. A mistake found before the last step leaves no run behind and changes none."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import QUICK, runs_of
from trainlab.config_check import ConfigError, check_config

BAD_VALUES = [
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1: must be an integer >= 1"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0: must be an integer >= 1"),
    ("data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
    ("optimizer.lr=abc", "optimizer.lr=abc: must be a number > 0"),
    ("seed=abc", "seed=abc: must be an integer"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1: must be a number > 0"),
    ("+trainer.foo=1", "trainer.foo: not a setting of trainlab.runner.Runner (conf/trainer/"
                       "default.yaml); accepted: accelerator, accumulate_grad_batches,"),
    ("+data.batchsize=3", "data.batchsize: not a setting trainlab reads (added with +); data "
                          "has: batch_size, check, dataset,"),
    ("logger.experiment_name=123", "logger.experiment_name=123: must be a non-empty string"),
    ("trainer.early_stopping.patience=0", "trainer.early_stopping.patience=0: must be an"),
    ("precision=fp16", "precision.mode=fp16 (precision=fp16) needs a GPU"),
    ("trainer.checkpoint_every_n_steps=0",
     "trainer.checkpoint_every_n_steps=0: must be an integer >= 1, or null (epoch ends only)"),
    ("trainer.checkpoint_every_n_minutes=-5",
     "trainer.checkpoint_every_n_minutes=-5: must be a number > 0, or null (epoch ends only)"),
    ("trainer.save_top_k=0",
     "trainer.save_top_k=0: must be an integer >= 1, or null (last.pt and best.pt only)"),
    ("trainer.devices=0", "trainer.devices=0: must be auto, a number >= 1"),
    ("model.freeze=true", "model.freeze=True: must be none, backbone, or a list of name "
                          "patterns like [conv1.*, layer1.*]"),
    ("model.unfreeze_at_epoch=0", "model.unfreeze_at_epoch=0: must be an integer >= 1"),
    ("model.freeze=backbone model.unfreeze_at_epoch=3 trainer.max_epochs=3",
     "model.unfreeze_at_epoch=3: the layers would unfreeze after the last epoch "
     "(trainer.max_epochs=3); choose an epoch from 1 to 2"),
    ("model.image_size=[4,4]", "model=mlp cannot take a batch of data=digits (in_channels=1, "
                               "image_size=[8, 8], num_classes=10), shaped 4×1×8×8:"),
    ("model.num_classes=5", "model=mlp gives 5 outputs per sample but data.num_classes=10"),
    ("model=torchvision model.name=vit_b_16",
     "model.name=vit_b_16 cannot take the data's image size 8×8"),
]


@pytest.mark.no_store
@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_a_bad_value_is_one_line_and_leaves_no_run(trainlab_in_process, tmp_path, override,
                                                   message):
    outcome = trainlab_in_process("train", "model=mlp", "trainer.progress_bar=false",
                                  *override.split(), check=False)
    assert outcome.returncode == 1
    assert outcome.stderr.splitlines() == [outcome.stderr.strip()], outcome.stderr
    assert outcome.stderr.startswith(f"error: {message}")
    assert not (tmp_path / "mlflow.db").exists()  # MLflow was never reached
    assert not (tmp_path / "outputs").exists()  # nor an output folder left behind
    assert "epoch" not in outcome.stdout


@pytest.mark.no_store
def test_every_error_of_a_config_is_reported_together(run_trainlab, tmp_path):
    proc = run_trainlab("train", "trainer.max_epochs=0", "data.batch_size=0", "seed=x",
                        "+optimizer.foo=1", check=False)
    assert proc.returncode == 1
    *values, unknown = proc.stderr.splitlines()
    assert values == [
        "error: seed=x: must be an integer",
        "error: trainer.max_epochs=0: must be an integer >= 1",
        "error: data.batch_size=0: must be an integer >= 1",
    ]
    accepted = unknown.removeprefix("error: optimizer.foo: not a setting of torch.optim.Adam "
                                    "(conf/optimizer/adam.yaml); accepted: ").split(", ")
    assert {"lr", "betas", "weight_decay", "head_lr", "no_decay_norm_bias"} <= set(accepted)
    assert accepted == sorted(accepted) and "params" not in accepted  # the code passes those
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


SWEEPS_REFUSED = {
    "grid": (["optimizer.lr=1e-3,abc", "seed=1,2"], [
        "error: trainer.max_epochs=0: must be an integer >= 1 (4 of 4 jobs; none was run)",
        "error: optimizer.lr=abc: must be a number > 0 (2 of 4 jobs; none was run)",
    ]),
    "search": (["hydra/sweeper=optuna", "optimizer.lr=interval(1e-4,1e-2)"], [
        "error: trainer.max_epochs=0: must be an integer >= 1 (every trial; none was run)",
    ]),
}


@pytest.mark.no_store
@pytest.mark.parametrize("sweep", SWEEPS_REFUSED)
def test_a_sweep_checks_every_job_before_the_first_one_runs(run_trainlab, tmp_path, sweep):
    overrides, errors = SWEEPS_REFUSED[sweep]
    proc = run_trainlab("train", "-m", "model=mlp", *overrides, "trainer.max_epochs=0",
                        check=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == errors
    assert "epoch" not in proc.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def test_every_shipped_option_passes_the_check(compose):
    cfg = compose()
    check_config(cfg, {})
    with pytest.raises(ConfigError) as caught:
        check_config(compose("trainer.max_epochs=1.5", "data.num_workers=-1"), {})
    assert caught.value.problems == [
        "trainer.max_epochs=1.5: must be an integer >= 1",
        "data.num_workers=-1: must be an integer >= 0",
    ]


def test_the_dry_run_leaves_weights_and_every_random_stream_as_they_were(compose, tmp_path):
    from trainlab.preflight import try_one_batch
    from trainlab.seeding import seed_everything
    from trainlab.train import prepare

    cfg = compose("model=cnn", "model.dropout=0.5", "trainer.progress_bar=false")
    choices = {"model": "cnn", "data": "digits"}
    seed_everything(0)
    runner = prepare(cfg, None, tmp_path, choices).runner
    runner.model.train()
    weights = copy.deepcopy(runner.model.state_dict())  # BatchNorm statistics included
    streams = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    try_one_batch(runner, cfg.data, choices)
    assert runner.model.training
    assert all(torch.equal(weights[k], v) for k, v in runner.model.state_dict().items())
    assert random.getstate() == streams[0]
    assert np.array_equal(np.random.get_state()[1], streams[1])
    assert torch.equal(torch.get_rng_state(), streams[2])


def test_a_resume_checkpoint_that_does_not_fit_leaves_its_run_untouched(
    trainlab_in_process, mlflow_client, tmp_path
):
    first = trainlab_in_process("train", *QUICK, "trainer.max_epochs=1", "logger.log_model=none",
                                "hydra.run.dir=outputs/runs/mlp")
    assert first.returncode == 0, first.stderr
    (before,) = runs_of(mlflow_client)
    last = tmp_path / "outputs/runs/mlp/checkpoints/last.pt"
    outcome = trainlab_in_process("train", "model=cnn", "trainer.progress_bar=false",
                                  f"trainer.resume={last}", check=False)
    assert outcome.returncode == 1
    assert outcome.stderr.startswith(f"error: trainer.resume={last} does not fit this run's")
    assert [d.name for d in (tmp_path / "outputs/runs").iterdir()] == ["mlp"]  # its folder only
    assert last.is_file()
    (after,) = runs_of(mlflow_client)
    assert after.info.run_id == before.info.run_id
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.tags == before.data.tags
    assert OmegaConf.create(after.data.params) == OmegaConf.create(before.data.params)


@pytest.mark.no_store
def test_logger_none_trains_and_writes_checkpoints_without_a_tracking_store(
    trainlab_in_process, tmp_path
):
    outcome = trainlab_in_process("train", *QUICK, "logger=none", "hydra.run.dir=out/run")
    assert outcome.returncode == 0, outcome.stderr
    assert "epoch   2/2" in outcome.stdout
    best = torch.load(tmp_path / "out/run/checkpoints/best.pt", weights_only=True)
    assert best["mlflow_run_id"] is None and best["metrics"]["val/acc"] > 0.5
    assert (tmp_path / "out/run/checkpoints/last.pt").is_file()
    sweep = trainlab_in_process("train", "-m", *QUICK, "logger=none", "seed=1,2",
                                "hydra.sweep.dir=out/sweep")
    assert sweep.returncode == 0, sweep.stderr
    assert len(list((tmp_path / "out/sweep").glob("*/checkpoints/last.pt"))) == 2
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


class EpochsSeen:
    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, runner, epoch, metrics):
        self.epochs.append(epoch)


def test_yaml_callbacks_join_the_ones_the_code_adds(compose, tmp_path):
    from trainlab.tracker import NullTracker
    from trainlab.train import fit

    # lr 0: val/acc never improves, so the YAML's early stopping (patience 1) ends epoch 2
    cfg = compose(*QUICK, "trainer.max_epochs=5", "optimizer.lr=1e-12",
                  "trainer.callbacks=[{_target_: trainlab.runner.EarlyStopping, patience: 1}]")
    seen = EpochsSeen()
    result = fit(cfg, NullTracker(), tmp_path, {}, callbacks=[seen])
    assert seen.epochs == [0, 1] and len(result.history) == 2


def test_both_trackers_take_every_call_the_tracker_protocol_names():
    """A method the run calls on MLflow's tracker must exist on the silent one too, or
    `logger=none` and DDP ranks > 0 fail where MLflow runs pass."""
    import inspect

    from trainlab.tracker import NullTracker, Tracker
    from trainlab.tracking import MlflowTracker

    wanted = {name for name, _ in inspect.getmembers(Tracker, inspect.isfunction)
              if not name.startswith("_")}
    assert {"run", "log_metrics", "log_datasets", "log_model"} <= wanted
    for tracker in (NullTracker, MlflowTracker):
        missing = {name for name in wanted if not callable(getattr(tracker, name, None))}
        assert not missing, f"{tracker.__name__} lacks {sorted(missing)}"
