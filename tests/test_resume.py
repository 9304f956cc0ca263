"""Resume as a record: refusals leave the old run exactly as it was, a branch is a new run
tagged with its origin, and a hard kill after a periodic checkpoint then resume logs every
step once with the weights of a run never interrupted."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import threading
import time

import pytest
import torch

from conftest import TRAINLAB, runs_of, stalled_store

RUN = ["model=mlp", "model.hidden=[16]", "trainer.progress_bar=false", "logger.log_model=none",
       "logger.log_checkpoints=false", "trainer.deterministic=true"]


def snapshot(client, run_id):
    run = client.get_run(run_id)
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
               for key in run.data.metrics}
    return run.info.status, run.info.end_time, run.data.tags, history


@pytest.mark.slow
def test_refused_resumes_leave_the_run_as_it_was_and_new_run_branches_off(
    run_trainlab, mlflow_client, tmp_path
):
    run_trainlab("train", *RUN, "trainer.max_epochs=2", "seed=7", "hydra.run.dir=first")
    ckpts = tmp_path / "first" / "checkpoints"
    shutil.copy(ckpts / "last.pt", tmp_path / "old.pt")
    run_trainlab("train", *RUN, "trainer.max_epochs=3", "trainer.resume=last",
                 "hydra.run.dir=first")
    (run,) = runs_of(mlflow_client)
    before = snapshot(mlflow_client, run.info.run_id)
    assert len(before[3]["val/acc"]) == 3 and before[0] == "FINISHED"
    # the run stands for what it started with, updated by the resume: a resume command
    # that does not repeat seed=7 trains on with it (the checkpoint's random streams)
    assert before[2]["trainlab.command"].endswith(" trainer.max_epochs=3 seed=7")
    assert "seed" not in before[2]["trainlab.resume_command"]
    config = mlflow_client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert {"max_epochs: 3", "seed: 7"} <= {line.strip() for line in open(config)}
    repeat = run_trainlab("reproduce", run.info.run_id).stdout.splitlines()
    assert "config:   today's configs give the same values" in repeat
    assert shlex.split(repeat[-1].removeprefix("command:  ")) == \
        before[2]["trainlab.command"].split()
    (resumed,) = mlflow_client.list_artifacts(run.info.run_id, "resumes")
    second_epoch_end = sorted(before[3]["val/acc"])[1][0]  # where the resume went on
    assert resumed.path == f"resumes/step_{second_epoch_end}"
    assert {a.path.rsplit("/", 1)[-1]
            for a in mlflow_client.list_artifacts(run.info.run_id, resumed.path)} == {
        "config.yaml", ".hydra"}

    behind = run_trainlab("train", *RUN, "trainer.max_epochs=5", "trainer.resume=old.pt",
                          check=False)
    assert behind.returncode == 1
    assert f"resume from the newer {ckpts / 'last.pt'}" in behind.stderr
    fewer = run_trainlab("train", *RUN, "trainer.max_epochs=2",
                         f"trainer.resume={ckpts / 'last.pt'}", check=False)
    assert fewer.returncode == 1
    assert "3 epoch(s) done; trainer.max_epochs=2 leaves nothing to train" in fewer.stderr
    other = run_trainlab("train", *RUN, "optimizer=sgd", "trainer.max_epochs=5",
                         f"trainer.resume={ckpts / 'last.pt'}", check=False)
    assert other.stderr.strip().splitlines() == [
        f"error: trainer.resume={ckpts / 'last.pt'} holds another optimizer's state (without "
        "the dampening, momentum, nesterov that SGD keeps): resume with the optimizer it "
        f"trained with, or start SGD from its weights with model.weights_path={ckpts / 'last.pt'}"]
    mid_epoch = torch.load(ckpts / "last.pt", weights_only=True)
    mid_epoch.update(epoch=2, batches_done=5, batch_size=64)
    torch.save(mid_epoch, ckpts / "last.pt")  # as a stop inside epoch 3 leaves it
    smaller = run_trainlab("train", *RUN, "trainer.max_epochs=5", "data.batch_size=32",
                           f"trainer.resume={ckpts / 'last.pt'}", check=False)
    assert smaller.stderr.strip().endswith(
        "stopped inside epoch 3 after 5 batches of 64; data.batch_size=32 would go on from "
        "other samples: resume with data.batch_size=64")
    assert "Traceback" not in behind.stderr + fewer.stderr + other.stderr + smaller.stderr
    assert snapshot(mlflow_client, run.info.run_id) == before
    assert len(runs_of(mlflow_client)) == 1

    run_trainlab("train", *RUN, "trainer.max_epochs=4", "trainer.resume=old.pt",
                 "trainer.resume_as=new_run", "hydra.run.dir=branch")
    original, branch = runs_of(mlflow_client)
    assert snapshot(mlflow_client, run.info.run_id) == before
    assert branch.data.tags["trainlab.origin_run_id"] == run.info.run_id
    assert branch.info.status == "FINISHED"
    assert [m.value for m in mlflow_client.get_metric_history(branch.info.run_id, "epoch")] == [
        2, 3]
    assert (tmp_path / "branch" / "checkpoints" / "best.pt").is_file()


def checkpoint_position(path):
    """(epoch, batches done) a checkpoint was written at; read whole, as os.replace left it."""
    state = torch.load(path, weights_only=True)
    return state["epoch"], state["batches_done"]


class ChildOutput:
    """A child's merged output, read on a thread so a full pipe never blocks the child, with
    bounded waits that fail with what it printed."""

    def __init__(self, proc, limit_s=120):
        self.proc, self.lines, self.deadline = proc, [], time.monotonic() + limit_s
        threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True).start()

    def wait_until(self, ready, what):
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > self.deadline:
                self.proc.kill()
                pytest.fail(f"no {what}; the run printed:\n" + "".join(self.lines)[-4000:])
            time.sleep(0.01)

    def wait_for_checkpoint_after(self, position, path):
        self.wait_until(lambda: checkpoint_position(path) != position,
                        f"checkpoint after {position}")

    def wait_for(self, text):
        self.wait_until(lambda: any(text in line for line in list(self.lines)), repr(text))


@pytest.mark.slow
def test_hard_kill_while_the_store_stalls_then_resume_matches_an_uninterrupted_run(
    run_trainlab, mlflow_client, tmp_path, tracking_uri
):
    steady = [*RUN, "trainer.max_epochs=4", "data.batch_size=8", "logger.flush_every_s=0",
              "trainer.checkpoint_every_n_steps=25"]
    run_trainlab("train", *steady, "hydra.run.dir=whole")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(TRAINLAB), "train", *steady, "hydra.run.dir=cut"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = ChildOutput(proc)
    last = tmp_path / "cut" / "checkpoints" / "last.pt"
    output.wait_for("epoch   1/4")
    # the store stalls (another writer holds it) for two periodic checkpoints: what the run
    # logged meanwhile exists only in memory and in those checkpoints (epochs to spare, as a
    # busy machine may take the lock an epoch late)
    with stalled_store(tmp_path / "mlflow.db"):
        for _ in range(2):
            output.wait_for_checkpoint_after(checkpoint_position(last), last)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    cut_at = torch.load(last, weights_only=True)
    assert cut_at["batches_done"] is not None  # cut mid-epoch
    run_trainlab("train", *steady, "trainer.resume=last", "hydra.run.dir=cut")

    whole, cut = runs_of(mlflow_client)
    assert cut.info.status == "FINISHED"
    for key in ("train/loss", "val/acc", "epoch", "lr"):
        full = [m.step for m in mlflow_client.get_metric_history(whole.info.run_id, key)]
        resumed = [m.step for m in mlflow_client.get_metric_history(cut.info.run_id, key)]
        assert sorted(resumed) == sorted(full), key
    for key in ("train/loss_epoch", "train/acc"):  # the cut epoch's partial totals carried over
        full = [m.value for m in mlflow_client.get_metric_history(whole.info.run_id, key)]
        resumed = [m.value for m in mlflow_client.get_metric_history(cut.info.run_id, key)]
        assert resumed == pytest.approx(full, rel=1e-9), key
    a = torch.load(tmp_path / "whole/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(last, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_id_resumes_the_last_checkpoint_in_the_folder_its_run_names(
    trainlab_in_process, mlflow_client, tmp_path
):
    trainlab_in_process("train", *RUN, "trainer.max_epochs=1", "hydra.run.dir=first")
    (run,) = runs_of(mlflow_client)
    short = run.info.run_id[:8]  # as `trainlab runs` shows it
    trainlab_in_process("train", *RUN, "trainer.max_epochs=2", f"trainer.resume={short}")
    (again,) = runs_of(mlflow_client)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.value for m in mlflow_client.get_metric_history(run.info.run_id, "epoch")] == [
        0, 1]
    assert torch.load(tmp_path / "first/checkpoints/last.pt", weights_only=True)["epoch"] == 1
    command = trainlab_in_process("reproduce", short).stdout.splitlines()[-1]
    assert "trainer.max_epochs=2" in command and "trainer.resume" not in command  # from scratch

    too_short = trainlab_in_process("train", *RUN, f"trainer.resume={short[:4]}", check=False)
    assert too_short.stderr.strip() == (
        f"error: trainer.resume={short[:4]}: no such checkpoint file; a run id (or its "
        "prefix) needs 8 or more characters")

    (tmp_path / "first").rename(tmp_path / "moved")  # another machine: no such folder
    gone = trainlab_in_process("train", *RUN, "trainer.max_epochs=3",
                               f"trainer.resume={run.info.run_id}", check=False)
    assert gone.returncode == 1
    assert f"run {run.info.run_id} has no checkpoints/last.pt on this machine" in gone.stderr


def test_a_run_id_of_digits_that_hydra_reads_as_a_number_is_still_a_run_id(tmp_path):
    from trainlab.errors import TrainlabError
    from trainlab.resume import resume_checkpoint
    from trainlab.tracker import NullTracker

    with pytest.raises(TrainlabError, match="^trainer.resume=12345678 names an MLflow run, "
                                            "but logger=none has no store"):
        resume_checkpoint(12345678, tmp_path, NullTracker())


@pytest.mark.slow
def test_a_run_stopped_after_its_last_epoch_is_finished_by_its_resume(
    run_trainlab, mlflow_client, tmp_path, tracking_uri
):
    """A signal after the last epoch (a preemption warning while the model is logged) ends
    the run KILLED with no model; resuming logs what it missed, trains nothing, and the run
    ends FINISHED. A finished run is then refused: nothing is left to train."""
    job = ["model=mlp", "model.hidden=[16]", "trainer.progress_bar=false",
           "trainer.max_epochs=2", "hydra.run.dir=cut"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(TRAINLAB), "train", *job], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "epoch   2/2" in line:
            proc.send_signal(signal.SIGTERM)
            break
    seen += proc.stdout.read()
    assert proc.wait() == 130, "".join(seen)[-3000:]
    (run,) = runs_of(mlflow_client)
    assert run.info.status == "KILLED" and "trainlab.model_epoch" not in run.data.tags

    run_trainlab("train", *job, "trainer.resume=last")
    (run,) = runs_of(mlflow_client)
    assert run.info.status == "FINISHED" and run.data.tags["trainlab.model_epoch"] == "2"
    assert [m.value for m in mlflow_client.get_metric_history(run.info.run_id, "epoch")] == [
        0, 1]
    again = run_trainlab("train", *job, "trainer.resume=last", check=False)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1].endswith(
        "leaves nothing to train: set trainer.max_epochs above 2")
    assert mlflow_client.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("prefix", ["01234567", "8e123456"])
def test_a_run_id_prefix_hydra_reads_as_a_number_is_looked_up_as_typed(
    trainlab_in_process, mlflow_client, prefix
):
    outcome = trainlab_in_process("train", *RUN, f"trainer.resume={prefix}", check=False)
    assert outcome.returncode == 1
    assert outcome.stderr.strip() == (f"error: trainer.resume={prefix}: no run of this "
                                      f"experiment has an id starting with '{prefix}'")


def test_a_resume_with_a_new_learning_rate_says_the_checkpoint_state_wins(
    trainlab_in_process, mlflow_client
):
    trainlab_in_process("train", *RUN, "trainer.max_epochs=1", "hydra.run.dir=first")
    again = trainlab_in_process("train", *RUN, "trainer.max_epochs=2", "optimizer.lr=0.01",
                                "trainer.resume=last", "hydra.run.dir=first")
    said = again.stdout + again.stderr
    assert "not re-logged: optimizer.lr=0.01, trainer.max_epochs=2" in said
    assert "not applied either: optimizer.lr; the optimizer and scheduler go on" in said
    (run,) = runs_of(mlflow_client)
    assert run.data.params["optimizer.lr"] == "0.001"
    assert {m.value for m in mlflow_client.get_metric_history(run.info.run_id, "lr")} == {0.001}


def test_a_run_resumed_after_its_layers_were_unfrozen_goes_on_as_if_never_stopped(
    trainlab_in_process, mlflow_client, tmp_path
):
    """Gradual unfreezing adds BatchNorm statistics and a param group (with the scheduler's
    per-group state) mid-run: a checkpoint from after that point fits a resumed run, which
    ends with the weights and lr curves of a run never stopped."""
    job = ["model=timm", "model.name=test_resnet", "model.freeze=backbone",
           "model.freeze_bn=true", "model.unfreeze_at_epoch=1", "scheduler=steplr",
           "scheduler.step_size=1", "trainer.deterministic=true", "trainer.progress_bar=false",
           "logger.log_model=none", "logger.log_system_metrics=false"]
    trainlab_in_process("train", *job, "trainer.max_epochs=3", "hydra.run.dir=whole")
    trainlab_in_process("train", *job, "trainer.max_epochs=2", "hydra.run.dir=cut")
    trainlab_in_process("train", *job, "trainer.max_epochs=3", "trainer.resume=last",
                        "hydra.run.dir=cut")

    whole, cut = runs_of(mlflow_client)
    assert cut.info.status == "FINISHED"
    for key in ("lr", "lr/unfrozen", "val/acc"):  # the lr series goes on under its name
        full, resumed = (sorted((m.step, m.value)
                                for m in mlflow_client.get_metric_history(run.info.run_id, key))
                         for run in (whole, cut))
        assert resumed == full, key
    assert "lr/backbone" not in cut.data.metrics
    a = torch.load(tmp_path / "whole/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
