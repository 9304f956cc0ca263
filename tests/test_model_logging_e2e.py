"""The logged model: what `mlflow.pytorch.load_model` gives back, serving, and the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import runs_of
from trainlab.errors import TrainlabError

QUICK = ["model=mlp", "trainer.max_epochs=1", "trainer.progress_bar=false"]


def test_loaded_model_is_the_trained_module_and_is_registered(run_trainlab, mlflow_client,
                                                              tracking_uri, tmp_path):
    import mlflow
    import mlflow.pytorch

    from trainlab.data.datasets import load_digits
    from trainlab.models.finetune import load_weights
    from trainlab.models.mlp import MLP

    run_trainlab("train", *QUICK, "logger.register_model=digits")
    (run,) = runs_of(mlflow_client)
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")

    assert isinstance(model, MLP)
    assert model.eval() is model and not model.training
    images = load_digits(seed=42).val.tensors[0][:16]
    trained = MLP(1, 10, (8, 8), hidden=[256])
    best = next(tmp_path.glob("outputs/runs/*/checkpoints/best.pt"))
    load_weights(trained, str(best), strict=True)
    with torch.no_grad():
        assert torch.equal(model(images), trained.eval()(images))  # the best epoch's weights

    served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert np.allclose(served.predict(images.numpy()), model(images).detach().numpy(), atol=1e-6)

    model.train()  # fine-tunable: gradients flow and a step changes the predictions
    before = model(images).detach()
    loss = torch.nn.functional.cross_entropy(model(images), torch.zeros(16, dtype=torch.long))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    assert not torch.allclose(model(images), before)

    (version,) = mlflow_client.search_model_versions("name='digits'")
    assert version.run_id == run.info.run_id


@pytest.mark.slow
def test_a_sweeps_best_job_is_the_champion(run_trainlab, mlflow_client):
    run_trainlab("train", "-m", *QUICK, "optimizer.lr=1e-5,1e-2", "logger.register_model=digits")
    jobs = [r for r in runs_of(mlflow_client) if "mlflow.parentRunId" in r.data.tags]
    best = max(jobs, key=lambda r: r.data.metrics["val/acc"])
    assert best.data.params["optimizer.lr"] == "0.01"
    champion = mlflow_client.get_model_version_by_alias("digits", "champion")
    assert champion.run_id == best.info.run_id
    assert len(mlflow_client.search_model_versions("name='digits'")) == 2


@pytest.mark.slow
def test_pt2_format_is_an_inference_graph(compose, tracking_uri, tmp_path):
    import mlflow.pytorch

    from trainlab.components import build
    from trainlab.models.mlp import MLP

    cfg = compose("logger.model_format=pt2", f"logger.tracking_uri={tracking_uri}")
    tracker = build(cfg.logger, "logger")
    model = MLP(1, 10, (8, 8)).eval()
    example = torch.rand(2, 1, 8, 8)
    with tracker.run("pt2", {}):
        tracker.log_model(model, example.numpy())
    loaded = mlflow.pytorch.load_model(f"runs:/{tracker.run_id}/model")
    assert not isinstance(loaded, MLP)
    assert torch.allclose(loaded(example), model(example), atol=1e-6)


def test_an_unknown_model_format_is_refused_in_one_line(compose):
    from trainlab.components import build

    with pytest.raises(TrainlabError, match=r"^logger.model_format='onnx'; choose pickle"):
        build(compose("logger.model_format=onnx").logger, "logger")
