"""Runs that survive faults: resume, NaN losses, early stopping, bad checkpoints, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import FAST, TRAINLAB, runs_of
from trainlab.checkpoint import resolve_resume
from trainlab.errors import TrainlabError
from trainlab.seeding import seed_everything
from trainlab.tracker import NullTracker
from trainlab.train import fit


def train(compose, out, *overrides, callbacks=(), resume=None):
    cfg = compose(*FAST, *overrides)
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    return fit(cfg, NullTracker.like(cfg.logger), out, {}, callbacks=callbacks, resume=resume)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(compose, tmp_path):
    dropout = ["model.dropout=0.3", "trainer.deterministic=true"]  # draws from the RNG
    train(compose, tmp_path / "full", *dropout, "trainer.max_epochs=2")
    train(compose, tmp_path / "first", *dropout, "trainer.max_epochs=1")
    result = train(compose, tmp_path / "rest", *dropout, "trainer.max_epochs=2",
                   resume=tmp_path / "first" / "checkpoints" / "last.pt")
    assert [m["epoch"] for m in result.history] == [1]
    full, resumed = weights(tmp_path / "full/checkpoints/last.pt"), weights(
        tmp_path / "rest/checkpoints/last.pt")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


class BlowUpAfterFirstEpoch:
    def on_epoch_end(self, runner, epoch, metrics):
        if epoch == 0:
            for group in runner.optimizer.param_groups:
                group["lr"] = 1e12


@pytest.mark.parametrize("anomaly", [False, True])
def test_nan_loss_names_epoch_and_step_and_keeps_the_last_good_checkpoint(
    compose, tmp_path, anomaly
):
    with pytest.raises(TrainlabError) as caught:
        train(compose, tmp_path, "optimizer=sgd", "trainer.max_epochs=3",
              f"trainer.detect_anomaly={anomaly}", callbacks=[BlowUpAfterFirstEpoch()])
    message = str(caught.value)
    assert "epoch 2, step" in message
    assert ("autograd anomaly" in message) is anomaly or "loss became" in message
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 0 and last["batches_done"] is None
    assert all(torch.isfinite(w).all() for w in last["model"].values())


def test_early_stopping_ends_the_fit_after_patience_epochs_without_progress(compose, tmp_path):
    stopping = ["optimizer.lr=0.0", "trainer.max_epochs=10", "trainer.monitor=val/loss",
                "trainer.monitor_mode=min", "trainer.early_stopping.patience=2"]
    result = train(compose, tmp_path, *stopping)
    assert len(result.history) == 3 and result.best_epoch == 0

    # resumed from where it stopped (its run was cut off while closing): nothing more trains
    last = tmp_path / "checkpoints" / "last.pt"
    again = train(compose, tmp_path, *stopping, resume=last)
    assert again.history == [] and again.best_epoch == 0
    assert torch.load(last, weights_only=True)["epoch"] == 2
    # and the resume check refuses it, saying how to train on
    from omegaconf import OmegaConf

    from trainlab.resume import plan_resume

    trainer = OmegaConf.merge(compose(*stopping).trainer, {"resume": str(last)})
    with pytest.raises(TrainlabError, match=r"stopped early after epoch 3 \(no better val/loss "
                                            r"for 2 epochs\): nothing to train; raise trainer"):
        plan_resume(trainer, tmp_path, NullTracker())
    trainer.early_stopping.patience = 5
    assert plan_resume(trainer, tmp_path, NullTracker()).checkpoint == last


def test_resume_from_a_foreign_or_mismatched_file_is_a_clear_error(compose, tmp_path):
    foreign = tmp_path / "notes.pt"
    foreign.write_text("not a checkpoint")
    with pytest.raises(TrainlabError, match="notes.pt is not a readable checkpoint"):
        train(compose, tmp_path / "a", "trainer.max_epochs=1", resume=foreign)
    train(compose, tmp_path / "cnn", "model=cnn", "trainer.max_epochs=1")
    with pytest.raises(TrainlabError, match="does not fit this run's model"):
        train(compose, tmp_path / "b", "trainer.max_epochs=1",
              resume=tmp_path / "cnn/checkpoints/last.pt")


def test_resume_last_picks_the_current_output_dir_then_the_newest_other_run(tmp_path):
    runs = tmp_path / "outputs" / "runs"
    for i, name in enumerate(["current", "old", "new"]):
        path = runs / name / "checkpoints" / "last.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    # `hydra.run.dir=D trainer.resume=last` continues D itself, though others are newer
    assert resolve_resume("last", runs / "current") == runs / "current/checkpoints/last.pt"
    (runs / "current/checkpoints/last.pt").unlink()
    assert resolve_resume("last", runs / "current") == runs / "new/checkpoints/last.pt"
    assert resolve_resume(None, runs / "current") is None
    with pytest.raises(TrainlabError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing.pt"), runs / "current")
    with pytest.raises(TrainlabError, match="trainer.resume=last but no run"):
        resolve_resume("last", tmp_path / "elsewhere" / "run")


@pytest.mark.slow
def test_sigterm_mid_run_checkpoints_and_resume_is_bit_identical(
    run_trainlab, mlflow_client, tmp_path, tracking_uri
):
    """A real process gets SIGTERM after its first epoch; resumed to epoch 4 it matches an
    uninterrupted 4-epoch run bit for bit (the interrupted one was asked for 100 epochs, so
    the signal surely lands mid-training)."""
    args = ["train", *FAST, "data.batch_size=16", "trainer.deterministic=true",
            "model.dropout=0.2"]
    run_trainlab(*args, "trainer.max_epochs=4", "hydra.run.dir=outputs/runs/full")

    cut = tmp_path / "outputs/runs/cut"
    proc = subprocess.Popen(
        [str(TRAINLAB), *args, "trainer.max_epochs=100", f"hydra.run.dir={cut}"], cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 240
    while not (cut / "checkpoints/last.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, out + err
    assert "interrupted at epoch" in out and "trainer.resume=" in out
    interrupted = runs_of(mlflow_client)[-1]
    assert interrupted.info.status == "KILLED"
    stopped_at = torch.load(cut / "checkpoints/last.pt", weights_only=True)
    assert stopped_at["mlflow_run_id"] == interrupted.info.run_id

    run_trainlab(*args, "trainer.max_epochs=4", "trainer.resume=last",
                 "hydra.run.dir=outputs/runs/resumed")
    full = weights(tmp_path / "outputs/runs/full/checkpoints/last.pt")
    resumed = weights(cut / "checkpoints/last.pt")  # a resumed run goes on in its own folder
    assert all(torch.equal(full[k], resumed[k]) for k in full), "bit-identical weights"

    runs = runs_of(mlflow_client)
    assert len(runs) == 2, "the resumed run continued the interrupted MLflow run"
    run = mlflow_client.get_run(interrupted.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.max_epochs"] == "100"
    epochs = mlflow_client.get_metric_history(run.info.run_id, "epoch")
    assert sorted(m.value for m in epochs) == [0, 1, 2, 3]
    steps = [m.step for m in sorted(epochs, key=lambda m: m.value)]
    assert steps == [90, 180, 270, 360], "metrics continue at the right step"
    loss_steps = [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(loss_steps) == len(set(loss_steps)), "no step logged twice"
