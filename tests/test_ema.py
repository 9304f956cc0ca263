"""trainer.ema: the moving average of the weights is what validates, checkpoints and ships."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import runs_of
from trainlab.errors import TrainlabError


def test_the_average_validates_and_is_checkpointed_beside_the_training_weights(
        compose, tmp_path):
    from trainlab.checkpoint import load_checkpoint
    from trainlab.data.datasets import load_digits
    from trainlab.models.mlp import MLP
    from trainlab.tracker import NullTracker
    from trainlab.train import fit

    cfg = compose("model=mlp", "trainer.ema=0.9", "trainer.max_epochs=2",
                  "trainer.progress_bar=false", "optimizer.lr=0.01")
    result = fit(cfg, NullTracker.like(cfg.logger), tmp_path, {})
    state = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert state["ema_updates"] == 2 * 23  # one per optimizer step: 1437 images / 64
    assert any(not torch.equal(state["model"][k], state["raw_model"][k]) for k in state["model"])

    images, labels = load_digits(seed=int(cfg.seed)).val.tensors
    averaged, trained = MLP(1, 10, (8, 8)), MLP(1, 10, (8, 8))
    averaged.load_state_dict(state["model"])
    trained.load_state_dict(state["raw_model"])
    with torch.no_grad():
        acc = (averaged.eval()(images).argmax(1) == labels).float().mean().item()
        raw_acc = (trained.eval()(images).argmax(1) == labels).float().mean().item()
    assert result.history[-1]["val/acc"] == pytest.approx(acc)  # validation saw the average
    assert raw_acc != pytest.approx(acc, abs=1e-4) or not torch.allclose(
        averaged(images), trained(images))


def test_a_decay_outside_zero_one_is_refused_in_one_line(compose, tmp_path):
    from trainlab.tracker import NullTracker
    from trainlab.train import fit

    cfg = compose("model=mlp", "trainer.ema=1.5", "trainer.progress_bar=false")
    with pytest.raises(TrainlabError, match=r"^trainer.ema=1.5; choose a decay in \(0, 1\)"):
        fit(cfg, NullTracker.like(cfg.logger), tmp_path, {})


@pytest.mark.parametrize("scheduler", ["onecycle", pytest.param("steplr", marks=pytest.mark.slow)])
def test_the_average_of_a_gradually_unfrozen_net_is_what_validates_and_ships(
        trainlab_in_process, mlflow_client, tracking_uri, tmp_path, scheduler):
    """Frozen backbone with frozen BatchNorm for one epoch, then every layer, under a
    scheduler: the logged model is the average, and it scores what the run logged."""
    import mlflow.pytorch

    from trainlab.checkpoint import load_checkpoint
    from trainlab.data.datasets import load_digits

    trainlab_in_process(
        "train", "model=timm", "model.name=test_resnet", "model.freeze=backbone",
        "model.freeze_bn=true", "model.unfreeze_at_epoch=1", "trainer.ema=0.8",
        f"scheduler={scheduler}", "trainer.max_epochs=3", "trainer.progress_bar=false",
        "logger.log_system_metrics=false")
    (run,) = runs_of(mlflow_client)
    assert run.info.status == "FINISHED"
    unfrozen = mlflow_client.get_metric_history(run.info.run_id, "lr/unfrozen")
    assert unfrozen and min(m.step for m in unfrozen) > 0  # joined after the first epoch

    best = load_checkpoint(Path(run.data.tags["trainlab.checkpoints"]) / "best.pt")
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    logged = model.state_dict()
    assert all(torch.equal(logged[key], value) for key, value in best["model"].items())
    assert any(not torch.equal(logged[key], value) for key, value in best["raw_model"].items()
               if value.is_floating_point())  # the average, not the weights that trained
    assert not any("Frozen" in type(layer).__name__ for layer in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # fine-tunable further

    images, labels = load_digits(seed=42).val.tensors
    with torch.no_grad():
        accuracy = (model.eval()(images).argmax(1) == labels).float().mean().item()
    history = sorted(mlflow_client.get_metric_history(run.info.run_id, "val/acc"),
                     key=lambda m: m.step)
    epoch = int(run.data.tags["trainlab.model_epoch"])
    assert accuracy == pytest.approx(history[epoch - 1].value, abs=1e-6)
