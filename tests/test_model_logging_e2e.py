"""The logged model: what `mlflow.pytorch.load_model` gives back, serving, and the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_model_elsewhere, runs_of
from trainlab.errors import TrainlabError

QUICK = ["model=mlp", "trainer.max_epochs=1", "trainer.progress_bar=false"]


def test_loaded_model_is_the_trained_module_and_is_registered(run_trainlab, mlflow_client,
                                                              tracking_uri, tmp_path):
    import mlflow
    import mlflow.pytorch

    from trainlab.data.datasets import load_digits
    from trainlab.inference import find_source
    from trainlab.models.finetune import load_weights, read_state_dict
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

    # where trainlab is not installed, the trainlab code logged beside the model restores it
    assert load_model_elsewhere(tracking_uri, run.info.run_id, best, tmp_path) == [
        "trainlab.models.mlp", "MLP", "True", "False"]

    # Without the run's output folder (another machine), the model's weights stand in for
    # its checkpoint in `trainlab eval run_id=...`.
    (tmp_path / "outputs").rename(tmp_path / "elsewhere")
    source = find_source({"run_id": run.info.run_id}, [], tmp_path)
    weights = read_state_dict(str(source.checkpoint))
    assert all(torch.equal(weights[k], v) for k, v in trained.state_dict().items())


SWEEP = ["-m", *QUICK, "trainer.max_epochs=2", "optimizer.lr=1e-5,1e-2"]


def models_of(client, run) -> list:
    """The MLflow models logged into ``run``."""
    return [m for m in client.search_logged_models([run.info.experiment_id])
            if m.source_run_id == run.info.run_id]


def test_a_sweep_logs_and_registers_only_its_best_jobs_model(run_trainlab, mlflow_client,
                                                             tracking_uri, tmp_path):
    import mlflow.pytorch

    from trainlab.models.mlp import MLP

    run_trainlab("train", *SWEEP, "logger.register_model=digits")  # log_model=best: default
    runs = runs_of(mlflow_client)
    (parent,) = [r for r in runs if r.data.tags.get("trainlab.role") == "sweep"]
    jobs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    best = max(jobs, key=lambda r: r.data.metrics["val/acc"])
    assert best.info.run_id == parent.data.tags["trainlab.best_run"]
    assert best.data.params["optimizer.lr"] == "0.01"

    (model,) = mlflow_client.search_logged_models([parent.info.experiment_id])
    assert model.source_run_id == best.info.run_id
    accs = [m.value for m in mlflow_client.get_metric_history(best.info.run_id, "val/acc")]
    assert best.data.tags["trainlab.model_epoch"] == str(accs.index(max(accs)) + 1)
    # logged after the job ended, which keeps its status and end time
    assert best.info.status == "FINISHED" and best.info.end_time < model.creation_timestamp
    (version,) = mlflow_client.search_model_versions("name='digits'")
    champion = mlflow_client.get_model_version_by_alias("digits", "champion")
    assert version.run_id == champion.run_id == best.info.run_id
    mlflow.set_tracking_uri(tracking_uri)
    assert isinstance(mlflow.pytorch.load_model("models:/digits@champion"), MLP)

    # Checkpoints are stored once: in the jobs' folders, not as MLflow artifacts.
    for job in jobs:
        assert (Path(job.data.tags["trainlab.checkpoints"]) / "best.pt").is_file()
        logged = {a.path for a in mlflow_client.list_artifacts(job.info.run_id, "checkpoints")}
        assert logged == {"checkpoints/class_names.json"}
    assert not list((tmp_path / "mlruns").rglob("*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize(("log_model", "per_job"), [("all", 1), ("none", 0), ("true", 1)])
def test_a_sweep_logs_every_jobs_model_or_none(run_trainlab, mlflow_client, log_model, per_job):
    run_trainlab("train", *SWEEP, f"logger.log_model={log_model}")
    jobs = [r for r in runs_of(mlflow_client) if "mlflow.parentRunId" in r.data.tags]
    assert [len(models_of(mlflow_client, job)) for job in jobs] == [per_job] * 2


def test_log_model_takes_all_best_none_and_refuses_the_rest(compose):
    from trainlab.config_check import check_config
    from trainlab.tracker import log_model_choice

    assert [log_model_choice(v) for v in (True, False, "best")] == ["all", "none", "best"]
    with pytest.raises(TrainlabError) as err:
        check_config(compose("logger.log_model=latest"), {})
    assert str(err.value) == ("logger.log_model=latest: must be one of all, best, none "
                              "(true and false mean all and none)")


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
