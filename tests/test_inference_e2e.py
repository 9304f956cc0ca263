"""`trainlab eval` and `trainlab predict` reuse the training builders, for every task."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from test_finetune_e2e import train_in_process

TINY_UNET = ["model=unet", "model.base_channels=4", "model.depth=1", "data.image_size=[16,16]",
             "data.batch_size=8", "trainer.monitor=val/dice"]
TASKS = {
    # class weights as a YAML list: the loss must be built as training builds it
    "classification": (["model=mlp", "loss.weight=[1,1,1,1,1,1,1,1,1,3]"], "val/acc"),
    "segmentation": (["data=shapes", "data.dataset.n_train=32", "data.dataset.n_val=16",
                      "loss=dice", *TINY_UNET], "val/dice"),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("task", TASKS)
def test_eval_gives_the_best_epochs_metrics_for_every_task(compose, tracking_uri, tmp_path,
                                                            mlflow_client, monkeypatch, task):
    import mlflow

    from trainlab.inference import evaluate

    overrides, monitor = TASKS[task]
    run_id = train_in_process(compose, tracking_uri, tmp_path / "train", *overrides,
                              "trainer.max_epochs=2", f"trainer.monitor={monitor}")
    history = [m.value for m in mlflow_client.get_metric_history(run_id, monitor)]

    mlflow.set_tracking_uri(tracking_uri)
    monkeypatch.chdir(tmp_path)
    metrics = evaluate({"run_id": run_id}, [])
    assert metrics[monitor] == pytest.approx(max(history), abs=1e-6)  # best.pt's epoch
    assert set(metrics) >= {"val/loss", monitor}


def write_shapes_folder(root, per_class=24, size=8):
    """image_folder layout: root/<class>/NAME.png; bright on the left or on the right."""
    rng = np.random.default_rng(0)
    for name, side in (("left", 0), ("right", 1)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            image[:, side * size // 2 : (side + 1) * size // 2] += 180
            Image.fromarray(image).save(root / name / f"{name}{i}.png")


@pytest.mark.slow
def test_predict_streams_names_classes_skips_bad_files_and_flips(
        compose, tracking_uri, tmp_path, monkeypatch, run_trainlab):
    import mlflow

    from trainlab.inference import predict

    write_shapes_folder(tmp_path / "sides")
    run_id = train_in_process(
        compose, tracking_uri, tmp_path / "train", "data=image_folder", "model=mlp",
        f"data.dataset.root={tmp_path / 'sides'}", "data.num_classes=2", "data.image_size=[8,8]",
        "data.num_workers=0", "data.persistent_workers=false", "data.pin_memory=false",
        "optimizer.lr=0.01", "trainer.max_epochs=4")
    images = tmp_path / "new"
    images.mkdir()
    for name in ("left", "right"):
        for i in range(3):
            (images / f"{name}{i}.png").write_bytes((tmp_path / "sides" / name /
                                                     f"{name}{i}.png").read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG not really")

    mlflow.set_tracking_uri(tracking_uri)
    monkeypatch.chdir(tmp_path)
    plain = predict({"run_id": run_id, "input": str(images), "output": "plain", "top_k": "2"},
                    ["data.batch_size=4"])  # two batches
    rows = list(csv.DictReader((plain / "predictions.csv").open()))
    assert [row["file"] for row in rows] == [f"{n}{i}.png" for n in ("left", "right")
                                             for i in range(3)]
    assert all(row["class"] == row["file"][:-5] for row in rows)  # names, and right ones
    assert all(row["top2"].split()[0] == f"{row['class']}:{float(row['probability']):.4f}"
               for row in rows)
    assert "broken.png" in (plain / "skipped.txt").read_text()

    flipped = predict({"run_id": run_id, "input": str(images), "output": "tta", "tta": "true"},
                      [])
    with_tta = {row["file"]: row for row in csv.DictReader((flipped / "predictions.csv").open())}
    # a mirror image of "left" is "right": the mean of both is unsure
    for row in rows:
        p_plain, p_tta = float(row["probability"]), float(with_tta[row["file"]]["probability"])
        assert p_tta < p_plain

    proc = run_trainlab("predict", f"run_id={run_id}", f"input={images}", "output=cli")
    assert "wrote predictions for 6 images" in proc.stdout
    assert "skipped 1 unreadable files" in proc.stdout and "broken.png" in proc.stdout
    bad = run_trainlab("predict", f"run_id={run_id}", f"input={images}", "tta=maybe",
                       check=False)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: tta='maybe'; choose true or false"
