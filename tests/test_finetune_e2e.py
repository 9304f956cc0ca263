"""Fine-tuning end to end: train → fine-tune frozen → eval/predict, and DDP checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import free_port, runs_of

FAST = ["trainer.progress_bar=false", "logger.log_model=none"]


def train_in_process(compose, tracking_uri: str, output_dir: Path, *overrides: str) -> str:
    """What `trainlab train` does, minus Hydra's process set-up; returns the MLflow run id."""
    from trainlab.components import build
    from trainlab.seeding import seed_everything
    from trainlab.train import fit

    cfg = compose(*overrides, *FAST, f"logger.tracking_uri={tracking_uri}")
    seed_everything(int(cfg.seed), False)
    tracker = build(cfg.logger, "logger")
    with tracker.run(output_dir.name, {}):
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        fit(cfg, tracker, output_dir, {})
    return tracker.run_id


def test_finetune_digits_trains_only_the_new_head(compose, tracking_uri, tmp_path,
                                                  mlflow_client):
    train_in_process(compose, tracking_uri, tmp_path / "pretrain",
                     "model=timm", "model.name=test_resnet", "trainer.max_epochs=1")
    pretrained = torch.load(tmp_path / "pretrain/checkpoints/best.pt", weights_only=True)["model"]
    train_in_process(compose, tracking_uri, tmp_path / "finetune", "experiment=finetune_digits",
                     f"model.weights_path={tmp_path / 'pretrain/checkpoints/best.pt'}",
                     "trainer.max_epochs=1")
    tuned = torch.load(tmp_path / "finetune/checkpoints/last.pt", weights_only=True)["model"]

    head = {"fc.weight", "fc.bias"}
    assert tuned["fc.weight"].shape[0] == 2 and pretrained["fc.weight"].shape[0] == 10
    for name, value in tuned.items():
        if name not in head and not name.endswith("num_batches_tracked"):
            assert torch.equal(value, pretrained[name]), f"frozen {name} changed"
    (run,) = runs_of(mlflow_client, "finetune_digits")
    assert run.data.metrics["val/acc"] > 0.6  # even/odd learnt by the head alone


UNFROZEN_GROUPS = {
    "head lr and no decay on biases": (
        ["model=cnn", "optimizer=adamw", "optimizer.lr=1e-4", "optimizer.head_lr=1e-2",
         "optimizer.head=[classifier.*]", "optimizer.weight_decay=0.05",
         "optimizer.no_decay_norm_bias=true"],
        {"unfrozen": (1e-4, 0.05), "unfrozen_backbone_no_decay": (1e-4, 0.0)}),
    "layer-wise decay": (
        ["model=timm", "model.name=test_resnet", "optimizer.lr=1e-3",
         "optimizer.layer_decay=0.5"], None),
}


@pytest.mark.parametrize("case", UNFROZEN_GROUPS)
def test_unfrozen_layers_train_with_the_lr_and_decay_their_config_gives_them(
        trainlab_in_process, mlflow_client, tmp_path, case):
    """The layers a run unfreezes join the optimizer as if they had trained from the start:
    the backbone's lr (not the head's), no weight decay where the config says none, the
    layer-wise lrs of their depth."""
    from trainlab.app import compose
    from trainlab.checkpoint import load_checkpoint
    from trainlab.models.finetune import build_model
    from trainlab.optim import build_optimizer

    overrides, expected = UNFROZEN_GROUPS[case]
    trainlab_in_process("train", *overrides, "model.freeze=backbone",
                        "model.unfreeze_at_epoch=1", "trainer.max_epochs=2",
                        "debug.train_batches=3", "debug.val_batches=1", *FAST)
    (run,) = runs_of(mlflow_client)
    last = load_checkpoint(Path(run.data.tags["trainlab.checkpoints"]) / "last.pt")
    joined = {g["name"]: (g["lr"], g["weight_decay"])
              for g in last["optimizer"]["param_groups"] if g["name"].startswith("unfrozen")}
    if expected is None:  # as the optimizer groups the whole net from the start
        cfg = compose("train", overrides)
        whole = build_optimizer(cfg.optimizer, build_model(cfg.model, None)[0])
        expected = {g["name"]: (g["lr"], g["weight_decay"]) for g in whole.param_groups}
        expected = {f"unfrozen_{name}": lrs for name, lrs in expected.items()
                    if name != max(expected)}  # the last layer, the head, trained from the start
    assert sorted(joined) == sorted(expected)
    for name, (lr, weight_decay) in expected.items():
        assert joined[name] == (pytest.approx(lr), weight_decay), name
    history = mlflow_client.get_metric_history(run.info.run_id, f"lr/{min(expected)}")
    assert history and all(m.value == pytest.approx(expected[min(expected)][0])
                           for m in history)  # the lr it trained at, logged as such


def test_eval_and_predict_a_run_from_mlflow(compose, tracking_uri, tmp_path, mlflow_client,
                                            run_trainlab, monkeypatch):
    import mlflow
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from trainlab.inference import evaluate

    run_id = train_in_process(compose, tracking_uri, tmp_path / "train",
                              "model=mlp", "trainer.max_epochs=3")
    trained = mlflow_client.get_run(run_id)

    mlflow.set_tracking_uri(tracking_uri)
    monkeypatch.chdir(tmp_path)
    metrics = evaluate({"run_id": run_id}, [])
    assert metrics["val/acc"] == pytest.approx(trained.data.metrics["val/acc"])
    (evaluation,) = [r for r in runs_of(mlflow_client) if r.info.run_id != run_id]
    assert evaluation.data.tags["trainlab.source_run_id"] == run_id
    assert run_id in evaluation.data.tags["mlflow.note.content"]
    assert evaluation.data.metrics["val/acc"] == metrics["val/acc"]
    assert mlflow_client.get_run(run_id).data.tags["trainlab.eval_run_id"] == \
        evaluation.info.run_id

    images = tmp_path / "images"
    images.mkdir()
    digits = load_digits()
    for i in range(6):
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(
            images / f"digit{i}.png")
    proc = run_trainlab("predict", f"run_id={run_id}", f"input={images}", "output=preds")
    assert "wrote predictions for 6 images" in proc.stdout
    rows = (tmp_path / "preds/predictions.csv").read_text().splitlines()
    assert rows[0] == "file,class,class_index,probability,top5" and len(rows) == 7
    predicted = [int(row.split(",")[1]) for row in rows[1:]]
    assert np.mean(np.array(predicted) == digits.target[:6]) >= 0.5

    bad = run_trainlab("eval", "run_id=0123456789abcdef", check=False)
    assert bad.returncode == 1 and "run_id=0123456789abcdef" in bad.stderr


def test_predict_writes_png_masks_for_segmentation(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from trainlab.checkpoint import save_checkpoint
    from trainlab.inference import predict
    from trainlab.models.unet import UNet

    config = OmegaConf.create({
        "data": {"in_channels": 3, "num_classes": 3, "image_size": [16, 16], "batch_size": 4,
                 "task": "segmentation"},
        "model": {"_target_": "trainlab.models.unet.UNet", "n_channels": "${data.in_channels}",
                  "n_classes": "${data.num_classes}", "base_channels": 4, "depth": 2},
    })
    torch.manual_seed(0)
    (tmp_path / "run/.hydra").mkdir(parents=True)
    save_checkpoint({"model": UNet(3, 3, base_channels=4, depth=2).state_dict()},
                    tmp_path / "run/checkpoints/best.pt")
    OmegaConf.save(config, tmp_path / "run/.hydra/config.yaml")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)).save(
        images / "scene.jpg")
    monkeypatch.chdir(tmp_path)
    out = predict({"ckpt": str(tmp_path / "run/checkpoints/best.pt"), "input": str(images)}, [])
    mask = Image.open(out / "scene.png")
    assert mask.size == (30, 20) and mask.mode == "L"
    assert set(np.unique(np.asarray(mask))) <= {0, 1, 2}


def _ddp_worker(rank: int, world: int, folder: str, port: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from trainlab.checkpoint import save_checkpoint
    from trainlab.models.cnn import CourseCNN
    from trainlab.models.finetune import load_weights

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        def net():
            return CourseCNN(1, 10, (8, 8), channels=(4, 8), hidden=16)

        torch.manual_seed(rank)  # different starting weights: DDP broadcasts rank 0's
        ddp = DistributedDataParallel(net())
        loss = ddp(torch.randn(4, 1, 8, 8)).logsumexp(1).mean()
        loss.backward()
        torch.optim.SGD(ddp.parameters(), lr=0.1).step()
        if rank == 0:
            save_checkpoint({"model": ddp.state_dict()}, Path(folder) / "ddp.pt")
        dist.barrier()
        single = net()
        load_weights(single, str(Path(folder) / "ddp.pt"), strict=True)
        for (name, a), b in zip(single.state_dict().items(), ddp.module.state_dict().values(),
                                strict=True):
            assert torch.equal(a, b), name
        if rank == 0:
            save_checkpoint({"model": single.state_dict()}, Path(folder) / "single.pt")
        dist.barrier()
        torch.manual_seed(100 + rank)
        again = DistributedDataParallel(net())
        load_weights(again, str(Path(folder) / "single.pt"), strict=True)
        for a, b in zip(again.module.parameters(), single.parameters(), strict=True):
            assert torch.equal(a, b)
    finally:
        dist.destroy_process_group()


def test_ddp_checkpoint_loads_into_a_single_device_model_and_back(tmp_path):
    import torch.multiprocessing as mp

    port = str(free_port())
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), port), nprocs=2, join=True)
    saved = torch.load(tmp_path / "ddp.pt", weights_only=True)["model"]
    assert all(name.startswith("module.") for name in saved)
    single = torch.load(tmp_path / "single.pt", weights_only=True)["model"]
    assert not any(name.startswith("module.") for name in single)
