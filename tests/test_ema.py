"""trainer.ema: the moving average of the weights is what validates, checkpoints and ships."""

from __future__ import annotations

import pytest
import torch

from trainlab.errors import TrainlabError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
