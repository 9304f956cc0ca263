"""The hot loop's helpers: metrics reach MLflow in batches, totals stay off the autograd graph."""

from __future__ import annotations

import time

import pytest
import torch

from trainlab.metrics import TaskMetrics
from trainlab.tracking import MlflowTracker


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_queued_metrics_arrive_in_one_batch_when_the_run_ends(tracking_uri, mlflow_client):
    tracker = MlflowTracker(tracking_uri, flush_every_s=3600)
    with tracker.run("queued", {}):
        for step in range(1, 26):
            tracker.log_metrics({"train/loss": 1.0 / step, "lr": 0.1}, step=step)
        assert history(mlflow_client, tracker.run_id, "train/loss") == []  # nothing sent yet
    logged = history(mlflow_client, tracker.run_id, "train/loss")
    assert [step for step, _ in logged] == list(range(1, 26))
    assert logged[4][1] == pytest.approx(0.2)
    assert len(history(mlflow_client, tracker.run_id, "lr")) == 25


def test_metrics_are_sent_while_training_once_the_flush_interval_passed(
    tracking_uri, mlflow_client
):
    """A background sender delivers them while the run is still open (within seconds)."""
    tracker = MlflowTracker(tracking_uri, flush_every_s=0)
    with tracker.run("live", {}):
        tracker.log_metrics({"train/loss": 0.5}, step=10)
        deadline = time.monotonic() + 30
        while not history(mlflow_client, tracker.run_id, "train/loss"):
            assert time.monotonic() < deadline, "nothing sent while the run was open"
            time.sleep(0.05)
        assert history(mlflow_client, tracker.run_id, "train/loss") == [(10, 0.5)]


def test_a_failed_run_keeps_the_metrics_logged_before_the_failure(tracking_uri, mlflow_client):
    tracker = MlflowTracker(tracking_uri, flush_every_s=3600)
    with pytest.raises(RuntimeError), tracker.run("fails", {}):
        tracker.log_metrics({"train/loss": 0.7}, step=3)
        raise RuntimeError("diverged")
    run = mlflow_client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert history(mlflow_client, tracker.run_id, "train/loss") == [(3, 0.7)]


@pytest.mark.parametrize("reduce_every", [1, 2, 32])
def test_training_totals_are_exact_and_hold_no_autograd_graph(reduce_every):
    totals = TaskMetrics("classification").train()
    totals.reduce_every = reduce_every  # folded every step, mid-window, or only when read
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 0, 0])
    loss = torch.nn.functional.cross_entropy(logits, targets)
    first = torch.nn.functional.cross_entropy(logits[:1], targets[:1])
    totals.update(loss, logits, targets)
    assert totals.window() == pytest.approx(loss.item())
    totals.update(first, logits[:1], targets[:1])
    totals.update(first, logits[:1], targets[:1])
    assert totals.window() == pytest.approx(first.item())
    assert not totals.loss_sum.requires_grad and not totals.hits.requires_grad
    result = totals.compute()
    assert result["acc"] == pytest.approx(4 / 5)
    assert result["loss"] == pytest.approx((3 * loss.item() + 2 * first.item()) / 5)
    assert logits.grad is None
