"""`trainlab eval` and `trainlab predict` reuse the training builders, for every task."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from conftest import copy_store, runs_of
from test_data import write_idx
from test_finetune_e2e import train_in_process

TINY_UNET = ["model=unet", "model.base_channels=4", "model.depth=1", "data.image_size=[16,16]",
             "data.batch_size=8", "trainer.monitor=val/dice"]
TASKS = {
    # class weights as a YAML list: the loss must be built as training builds it
    "classification": (["model=mlp", "loss.weight=[1,1,1,1,1,1,1,1,1,3]"], "val/acc"),
    "segmentation": (["data=shapes", "data.dataset.n_train=32", "data.dataset.n_val=16",
                      "loss=dice", *TINY_UNET], "val/dice"),
}




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
    assert "skipped 1 unreadable file (listed in" in proc.stdout and "broken.png" in proc.stdout
    bad = run_trainlab("predict", f"run_id={run_id}", f"input={images}", "tta=maybe",
                       check=False)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: tta='maybe'; choose true or false"


def mnist_with_test_files(root):
    """MNIST's raw IDX files (train and t10k) in torchvision's layout."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    write_idx(raw, "train", rng.integers(0, 256, (40, 28, 28)), np.arange(40) % 10)
    write_idx(raw, "t10k", rng.integers(0, 256, (20, 28, 28)), np.arange(20) % 10)
    return ["data=mnist", f"data.root={root}", "data.batch_size=16"]


def folder_with_test_root(root):
    write_shapes_folder(root / "train", per_class=8)
    write_shapes_folder(root / "test", per_class=3)
    return ["data=image_folder", f"data.dataset.root={root / 'train'}",
            f"data.dataset.test_root={root / 'test'}", *SMALL_IMAGES]


def csv_with_test_csv(root):
    write_shapes_folder(root / "img", per_class=8)
    files = sorted(root.glob("img/*/*.png"))
    for name, chosen in (("labels.csv", files[::2]), ("test.csv", files[1::2])):
        rows = [f"{f.relative_to(root / 'img')},{f.parent.name}" for f in chosen]
        (root / name).write_text("\n".join(["file,label", *rows]))
    return ["data=csv_images", f"data.dataset.root={root / 'img'}",
            f"data.dataset.csv={root / 'labels.csv'}", f"data.dataset.test_csv={root / 'test.csv'}",
            *SMALL_IMAGES]


SMALL_IMAGES = ["data.image_size=[8,8]", "data.num_workers=0", "data.persistent_workers=false",
                "data.pin_memory=false"]
TEST_SPLITS = {"mnist": mnist_with_test_files, "image_folder": folder_with_test_root,
               "csv_images": csv_with_test_csv}


@pytest.mark.parametrize("source", TEST_SPLITS)
def test_eval_split_test_logs_test_metrics_on_a_linked_run(trainlab_in_process, mlflow_client,
                                                           tmp_path, source):
    data = TEST_SPLITS[source](tmp_path / "data")
    trainlab_in_process("train", "model=mlp", "trainer.max_epochs=1", "trainer.progress_bar=false",
                        "logger.log_model=none", "trainer.top_k=2", *data)
    (trained,) = runs_of(mlflow_client)
    run_id = trained.info.run_id
    out = trainlab_in_process("eval", f"run_id={run_id[:8]}", "split=test").stdout  # as listed
    assert "test/acc = " in out
    evaluated = next(r for r in runs_of(mlflow_client) if r.info.run_id != run_id)
    assert evaluated.data.tags["trainlab.source_run_id"] == run_id
    assert mlflow_client.get_run(run_id).data.tags["trainlab.eval_run_id"] == \
        evaluated.info.run_id
    metrics = evaluated.data.metrics
    assert {"test/loss", "test/acc", "test/f1_macro"} <= set(metrics)
    assert not any(name.startswith("val/") for name in metrics)
    assert ("test/acc_top2" in metrics) == (source == "mnist")  # k < classes: 10, not 2
    if source == "mnist":  # torchvision's test files are also its validation split
        assert metrics["test/acc"] == pytest.approx(trained.data.metrics["val/acc"])


def test_eval_of_a_split_the_data_lacks_names_the_splits_it_has(trainlab_in_process,
                                                               mlflow_client):
    trainlab_in_process("train", "model=mlp", "trainer.max_epochs=1", "trainer.progress_bar=false",
                        "logger.log_model=none")
    (trained,) = runs_of(mlflow_client)
    proc = trainlab_in_process("eval", f"run_id={trained.info.run_id}", "split=test", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "split='test'; this data has train, val" in proc.stderr, proc.stderr
    assert len(runs_of(mlflow_client)) == 1  # no eval run left behind


def test_eval_refuses_a_bad_file_in_one_line_or_skips_it_as_training_does(
        trainlab_in_process, mlflow_client, tmp_path):
    data = folder_with_test_root(tmp_path / "data")
    trainlab_in_process("train", "model=mlp", "trainer.max_epochs=1", "trainer.progress_bar=false",
                        "logger.log_model=none", *data)
    (trained,) = runs_of(mlflow_client)
    broken = tmp_path / "data" / "test" / "left" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")

    refused = trainlab_in_process("eval", f"run_id={trained.info.run_id}", "split=test",
                                  check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    line = refused.stderr.strip().splitlines()[-1]  # after MLflow's download progress
    assert line.startswith(f"error: data: test split: {broken}: ") and \
        "data.skip_bad_files=true" in line
    assert len(runs_of(mlflow_client)) == 1  # nothing logged

    out = trainlab_in_process("eval", f"run_id={trained.info.run_id}", "split=test",
                              "data.skip_bad_files=true").stdout
    (skipped,) = [line for line in out.splitlines() if line.startswith("skipped ")]
    assert skipped.startswith("skipped 1 unreadable file of the test split") and \
        str(broken) in skipped
    evaluated = next(r for r in runs_of(mlflow_client) if r.info.run_id != trained.info.run_id)
    assert evaluated.data.params["eval.skipped_files"] == "1"
    assert "test/acc" in evaluated.data.metrics


@pytest.mark.parametrize(("command", "option"), [
    (["runs"], "--tracking-uri"), (["runs", "--cleanup"], "--tracking-uri"),
    (["reproduce", "0123abcd"], "--tracking-uri"),
    (["eval", "run_id=0123abcd"], "tracking_uri=URI"),
    (["predict", "run_id=0123abcd", "input=."], "tracking_uri=URI"),
])
def test_reading_commands_refuse_a_store_that_does_not_exist_and_create_none(
    trainlab_in_process, tmp_path, monkeypatch, command, option
):
    import mlflow

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "a.png")
    monkeypatch.chdir(elsewhere)
    missing = f"sqlite:///{elsewhere / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", missing)
    mlflow.set_tracking_uri(missing)
    outcome = trainlab_in_process(*command, check=False)
    assert outcome.returncode == 1
    assert outcome.stderr.strip().splitlines() == [
        f"error: no MLflow store at {missing}: nothing was tracked there; run this where you "
        f"trained, or name the store with {option} or MLFLOW_TRACKING_URI"]
    assert list(elsewhere.iterdir()) == [elsewhere / "a.png"]


def test_eval_and_predict_refuse_bad_values_a_missing_file_and_too_large_a_top_k(
        trainlab_in_process, mlflow_client, tmp_path):
    trainlab_in_process("train", "model=mlp", "trainer.max_epochs=1", "trainer.progress_bar=false",
                        "logger.log_model=none")
    (trained,) = runs_of(mlflow_client)
    run = f"run_id={trained.info.run_id}"
    bad = trainlab_in_process("eval", run, "data.batch_size=-1", "optimizer.lr=abc", check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-2:] == [
        "error: data.batch_size=-1: must be an integer >= 1",
        "error: optimizer.lr=abc: must be a number > 0"]
    missing = trainlab_in_process("eval", f"ckpt={tmp_path / 'none.pt'}", check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (f"error: ckpt={tmp_path / 'none.pt'}: no such file; pass a "
                                      "checkpoint (outputs/runs/<run>/checkpoints/best.pt) or "
                                      "run_id=ID")
    assert len(runs_of(mlflow_client)) == 1  # no eval run left behind

    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    images = [f"input={tmp_path}", f"output={tmp_path / 'preds'}"]
    too_many = trainlab_in_process("predict", run, *images, "top_k=11", check=False)
    assert too_many.returncode == 1
    assert too_many.stderr.strip().splitlines()[-1] == (
        "error: top_k='11'; choose a whole number from 1 to 10")
    assert not (tmp_path / "preds").exists()
    trainlab_in_process("predict", run, *images, "top_k=10")
    with open(tmp_path / "preds" / "predictions.csv") as f:
        assert next(csv.reader(f))[-1] == "top10"


def test_reading_commands_use_the_store_the_local_config_names_as_train_does(
        trainlab_in_process, tmp_path, empty_store, tracking_uri):
    """conf/local/default.yaml names the store; as for train, it comes before
    $MLFLOW_TRACKING_URI (here the test's own store), and an explicit one before both."""
    from mlflow.tracking import MlflowClient

    local = tmp_path / "local.db"
    copy_store(empty_store, local, default_artifacts=str(tmp_path / "mlruns" / "0"))
    (tmp_path / "conf" / "local").mkdir(parents=True)
    (tmp_path / "conf" / "local" / "default.yaml").write_text(
        f"paths:\n  store: sqlite:///{local}\n")
    trainlab_in_process("train", "model=mlp", "trainer.max_epochs=1", "trainer.progress_bar=false",
                        "logger.log_model=none", "logger.log_system_metrics=false")
    (run,) = runs_of(MlflowClient(f"sqlite:///{local}"))
    short = run.info.run_id[:8]
    assert any(line.startswith(short) for line in trainlab_in_process("runs").stdout.splitlines())
    assert "val/acc = " in trainlab_in_process("eval", f"run_id={short}").stdout
    assert "command:  trainlab train model=mlp" in trainlab_in_process("reproduce", short).stdout
    unknown = trainlab_in_process("eval", "run_id=abcdef", check=False)
    assert unknown.stderr.strip().splitlines()[-1] == (
        f"error: run_id=abcdef: no run of the store sqlite:///{local} has an id starting with "
        "'abcdef'")
    elsewhere = trainlab_in_process("reproduce", short, "--tracking-uri", tracking_uri,
                                    check=False)
    assert elsewhere.stderr.strip() == (f"error: no run of the store {tracking_uri} has an id "
                                        f"starting with '{short}'")
