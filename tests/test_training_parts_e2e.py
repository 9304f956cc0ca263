"""Losses, optimizers, schedulers and metrics through the real `trainlab` commands and MLflow."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import FAST, QUICK, runs_of
from trainlab.errors import TrainlabError


def test_run_logs_lr_changes_task_metrics_and_plots(trainlab_in_process, mlflow_client):
    trainlab_in_process("train", *QUICK, "scheduler=onecycle", "optimizer=sgd", "loss=focal",
                 "trainer.monitor=val/f1_macro", "logger.log_model=none")
    (run,) = runs_of(mlflow_client)
    metrics = run.data.metrics
    for name in ("train/acc", "val/acc", "val/acc_top5", "val/f1_macro", "val/loss"):
        assert 0 <= metrics[name] <= 1 or name == "val/loss", name
    lrs = mlflow_client.get_metric_history(run.info.run_id, "lr")
    steps = sorted(m.step for m in lrs)
    assert steps == sorted(set(steps))  # logged once per change, at its step
    first_epoch_end = min(m.step for m in mlflow_client.get_metric_history(run.info.run_id,
                                                                            "epoch"))
    first_epoch = [m.value for m in lrs if m.step <= first_epoch_end]
    assert len(set(first_epoch)) > 2  # onecycle changes the lr at every batch
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/lr_curve.png", "plots/confusion_matrix.png"}


def test_top_k_names_the_metric_and_can_be_monitored(trainlab_in_process, mlflow_client):
    trainlab_in_process("train", *FAST, "trainer.max_epochs=1", "trainer.top_k=3",
                        "trainer.monitor=val/acc_top3")
    (run,) = runs_of(mlflow_client)
    metrics = run.data.metrics
    assert "val/acc_top5" not in metrics
    assert metrics["val/acc"] <= metrics["val/acc_top3"] <= 1


@pytest.mark.parametrize("overrides, message", [
    (["trainer.top_k=1"], "trainer.top_k=1: must be an integer >= 2, or null"),
    (["trainer.top_k=10", "trainer.monitor=val/acc_top10"],  # digits has 10 classes
     "trainer.monitor='val/acc_top10' is never computed"),
])
def test_top_k_that_says_nothing_is_refused_in_one_line(trainlab_in_process, mlflow_client,
                                                        overrides, message):
    proc = trainlab_in_process("train", *FAST, *overrides, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert mlflow_client.get_experiment_by_name("trainlab") is None  # checked before MLflow


def test_lr_plot_writes_the_curve_of_any_scheduler(trainlab_in_process, tmp_path):
    proc = trainlab_in_process("lr-plot", "scheduler=warmup_cosine", "trainer.max_epochs=3",
                        "+out=curve.png")
    assert "wrote curve.png" in proc.stdout
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "outputs").exists()  # a plot leaves no run folder behind


@pytest.mark.parametrize("override, message", [
    ("trainer.max_epochs=-2", "trainer.max_epochs=-2: must be an integer >= 1"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0: must be an integer >= 1"),
    ("optimizer.lr=abc", "optimizer.lr=abc: must be a number > 0"),
])
def test_lr_plot_checks_the_values_as_train_does(trainlab_in_process, tmp_path, override,
                                                 message):
    proc = trainlab_in_process("lr-plot", "scheduler=onecycle", override, "+out=curve.png",
                               check=False)
    assert proc.returncode == 1 and proc.stderr == f"error: {message}\n"
    assert not (tmp_path / "curve.png").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss=dice"], "loss=dice does not fit data.task=classification with 10 classes "
                        "(classification); losses that fit: ce, nll, focal, bce_logits, bce, "),
        (["trainer.monitor=val/dice", "scheduler=plateau"],
         "trainer.monitor='val/dice' is never computed for data.task=classification"),
        (["optimizer.head_lr=0.1", "optimizer.head=[fc.*]"], "matches no trainable parameter"),
        (["loss.label_smoothing=abc"], "loss=ce fails on data.task=classification with 10 "
         "classes with its arguments (loss.ignore_index=-100, loss.label_smoothing=abc, "
         "loss.reduction=mean): cross_entropy_loss(): argument 'label_smoothing'"),
    ],
)
def test_bad_input_stops_before_the_first_step(compose, tmp_path, overrides, message):
    from trainlab.train import fit

    cfg = compose(*QUICK, *overrides)
    choices = OmegaConf.create({group: None for group in ("data", "model", "trainer")})
    choices.loss = "dice" if "loss=dice" in overrides else "ce"
    with pytest.raises(TrainlabError) as err:
        fit(cfg, tracker=None, output_dir=tmp_path, choices=choices)  # no tracker: no step ran
    assert message in str(err.value)
