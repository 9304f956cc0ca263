"""Every data source, read from small files written here in each real layout (no network),
its clear errors on bad input, and the loaders' seeding across epochs and workers."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainlab.components import build
from trainlab.data.check import prepare_data
from trainlab.data.loaders import InMemoryLoader, build_loaders
from trainlab.errors import TrainlabError

CPU = torch.device("cpu")


def build_data(compose, *overrides: str):
    cfg = compose(*overrides)
    return cfg, build(cfg.data.dataset, "data")


def first_batch(splits, cfg, augmentation=None, split=0):
    loaders = build_loaders(splits, cfg.data, int(cfg.seed), CPU, augmentation)
    return next(iter(loaders[split]))


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST's IDX format, uncompressed, under the names torchvision looks for."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 0x803, n, h, w) + images.astype(np.uint8).tobytes()
    )
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 0x801, n) + labels.astype(np.uint8).tobytes()
    )


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def test_fashion_mnist_reads_torchvision_raw_files(compose, tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw, "train", rng.integers(0, 256, (40, 28, 28)), np.arange(40) % 10)
    write_idx(raw, "t10k", rng.integers(0, 256, (12, 28, 28)), np.arange(12) % 10)
    cfg, splits = build_data(compose, "data=fashion_mnist", f"data.root={tmp_path}")
    assert len(splits.train) == 40 and len(splits.val) == 12
    assert splits.class_names[0] == "T-shirt/top"
    images, labels = first_batch(splits, cfg)
    assert images.shape == (40, 1, 28, 28) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and labels.max() == 9


@pytest.mark.parametrize(("option", "folder", "file"), [
    ("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
    ("cifar10", "cifar-10-batches-py", "test_batch"),
])
def test_missing_torchvision_files_say_where_to_put_them(compose, tmp_path, option, folder, file):
    with pytest.raises(TrainlabError) as err:
        build_data(compose, f"data={option}", f"data.root={tmp_path}")
    message = str(err.value)
    assert str(tmp_path / folder) in message
    assert file in message and "data.download=true" in message


def write_pixel_csv(path: Path, labels, rng) -> Path:
    header = "label," + ",".join(f"pixel{i + 1}" for i in range(784))
    rows = [f"{label}," + ",".join(map(str, rng.integers(0, 256, 784))) for label in labels]
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_fashion_mnist_csv_splits_by_seed_and_checks_labels(compose, tmp_path):
    rng = np.random.default_rng(0)
    train = write_pixel_csv(tmp_path / "train.csv", np.arange(30) % 10, rng)
    args = ["data=fashion_mnist_csv", f"data.dataset.train_csv={train}",
            "data.dataset.val_csv=null"]
    cfg, splits = build_data(compose, *args)
    assert (len(splits.train), len(splits.val)) == (24, 6)
    images, _ = first_batch(splits, cfg)
    assert images.shape == (24, 1, 28, 28)
    _, again = build_data(compose, *args)
    assert torch.equal(splits.val.tensors[1], again.val.tensors[1])
    write_pixel_csv(train, [0, 3, 12, 14, 1], rng)
    with pytest.raises(TrainlabError) as err:
        prepare_data(compose(*args), {})
    for split, label in (("train", 14), ("val", 12)):  # every bad label, in one report
        assert f"{split}: 1 labels outside 0..9 (data.num_classes=10): values [{label}]" in str(
            err.value)
    assert str(err.value).endswith("set data.num_classes, or fix the labels")


def test_image_folder_reads_and_resizes_per_class_folders(compose, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        for i in range(5):
            write_png(tmp_path / name / f"{i}.png", rng.integers(0, 256, (20, 30, 3)))
    cfg, splits = build_data(
        compose, "data=image_folder", f"data.dataset.root={tmp_path}", "data.num_classes=2",
        "data.image_size=[16,16]", "data.num_workers=0",
    )
    assert splits.class_names == ["cat", "dog"] and len(splits.train) + len(splits.val) == 10
    images, labels = first_batch(splits, cfg)
    assert images.shape == (8, 3, 16, 16) and set(labels.tolist()) <= {0, 1}


def test_image_folder_errors_name_the_bad_folder_or_file(compose, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        write_png(tmp_path / "a" / f"{i}.png", rng.integers(0, 256, (8, 8, 3)))
    (tmp_path / "b").mkdir()
    base = ["data=image_folder", f"data.dataset.root={tmp_path}", "data.num_workers=0",
            "data.dataset.val_fraction=0.5"]
    with pytest.raises(TrainlabError, match=r"(?s)Found no valid file for the classes b"):
        build_data(compose, *base)
    with pytest.raises(TrainlabError, match="does not exist"):
        build_data(compose, "data=image_folder", f"data.dataset.root={tmp_path / 'nope'}")

    good = write_png(tmp_path / "b" / "ok.png", rng.integers(0, 256, (8, 8, 3)))
    bad = tmp_path / "b" / "broken.png"
    bad.write_bytes(good.read_bytes()[:60])  # a truncated PNG
    cfg, splits = build_data(compose, *base)  # listing does not read files: loaders say which
    loader = build_loaders(splits, cfg.data, 0, CPU)[0]
    with pytest.raises(TrainlabError, match=f"cannot read image {bad}"):
        for _ in loader:
            pass
    cfg.data.num_workers = 2
    with pytest.raises(TrainlabError, match=f"^data: cannot read image {bad}") as err:
        for _ in build_loaders(splits, cfg.data, 0, CPU)[0]:
            pass
    assert "\n" not in str(err.value)  # the worker's traceback is not part of the message


def csv_images(folder: Path, labels: list) -> tuple[list[str], Path, list[str]]:
    """``len(labels)`` grey PNGs in ``folder/img`` and the lines of their labels CSV (written
    by the caller to the returned path), with the overrides that read them."""
    rng = np.random.default_rng(0)
    lines = ["file,label"]
    for i, label in enumerate(labels):
        write_png(folder / "img" / f"{i}.png", rng.integers(0, 256, (10, 10)))
        lines.append(f"{i}.png,{label}")
    table = folder / "labels.csv"
    args = ["data=csv_images", f"data.dataset.root={folder / 'img'}", f"data.dataset.csv={table}",
            "data.image_size=[12,12]", "data.dataset.val_fraction=0.5"]
    return lines, table, args


def test_csv_images_map_class_names(compose, tmp_path):
    lines, table, args = csv_images(tmp_path, ["ship" if i % 2 else "plane" for i in range(6)])
    table.write_text("\n".join(lines))
    args += ["data.in_channels=1", "data.num_workers=0"]
    cfg, splits = build_data(compose, *args)
    assert splits.class_names == ["plane", "ship"]
    images, _ = first_batch(splits, cfg)
    assert images.shape == (3, 1, 12, 12)
    with pytest.raises(TrainlabError, match=r"data.num_classes=3 but .*labels.csv names 2 "
                                            r"classes \(plane, ship\)"):
        build_data(compose, *args, "data.num_classes=3")


def test_csv_images_refuse_labels_unlike_the_others_and_read_a_bom(compose, tmp_path):
    lines, table, args = csv_images(tmp_path, [i % 3 for i in range(8)])
    table.write_text("\n".join(lines), encoding="utf-8-sig")  # as Excel saves it
    _, splits = build_data(compose, *args)
    assert splits.class_names == ["0", "1", "2"]
    table.write_text("\n".join([*lines[:-2], "6.png,", "7.png,cat"]))
    with pytest.raises(TrainlabError, match=r"^data: .*labels.csv lines 8 \(''\), 9 \('cat'\): "
                                            r"each label must be an integer, as the others are; "
                                            r"fix or remove those lines$"):
        build_data(compose, *args)


def write_carvana(root: Path, n=6, size=(40, 30), mask_size=None, values=(0, 255), ext="gif"):
    """Carvana's layout: train/NAME.jpg and train_masks/NAME_mask.gif, masks 0/255."""
    rng = np.random.default_rng(0)
    (root / "train_masks").mkdir(parents=True)
    for i in range(n):
        write_png(root / "train" / f"car{i}.jpg", rng.integers(0, 256, (size[1], size[0], 3)))
        mask_w, mask_h = mask_size or size
        mask = np.full((mask_h, mask_w), values[0], dtype=np.uint8)
        mask[mask_h // 4 : 3 * mask_h // 4, mask_w // 4 : 3 * mask_w // 4] = values[1]
        mask[0, 0] = values[-1]
        Image.fromarray(mask).save(root / "train_masks" / f"car{i}_mask.{ext}")
    return root


def seg_args(root: Path, *extra: str) -> list[str]:
    return ["data=segmentation_folder", f"data.dataset.root={root}", "data.num_workers=0",
            "data.image_size=[16,24]", "data.dataset.val_fraction=0.5", *extra]


def test_segmentation_folder_binarises_and_resizes_masks_by_nearest(compose, tmp_path):
    cfg, splits = build_data(compose, *seg_args(write_carvana(tmp_path)))
    images, masks = first_batch(splits, cfg)
    assert images.shape == (3, 3, 16, 24) and images.dtype == torch.float32
    assert masks.shape == (3, 16, 24) and masks.dtype == torch.long
    assert set(masks.unique().tolist()) == {0, 1}  # nearest: no in-between values


def test_segmentation_label_map_keeps_ignore_index(compose, tmp_path):
    root = write_carvana(tmp_path, values=(0, 128, 255), ext="png")  # grey levels, not a palette
    cfg, splits = build_data(compose, *seg_args(
        root, "data.dataset.mask_name='{stem}_mask.png'", "data.num_classes=2",
        "data.dataset.label_map={0: 0, 128: 1}", "data.ignore_index=255", "data.image_size=[30,40]",
    ))
    _, masks = first_batch(splits, cfg)
    assert set(masks.unique().tolist()) == {0, 1, 255}


def test_shapes_are_generated_from_the_seed(compose):
    small = ["data=shapes", "data.dataset.n_train=16", "data.dataset.n_val=4"]
    cfg, splits = build_data(compose, *small)
    _, same = build_data(compose, *small)
    _, other = build_data(compose, *small, "seed=7")
    images, masks = splits.train.tensors
    assert images.shape == (16, 3, 64, 64) and masks.shape == (16, 64, 64)
    assert torch.equal(images, same.train.tensors[0]) and torch.equal(masks, same.train.tensors[1])
    assert not torch.equal(masks, other.train.tensors[1])
    coverage = masks.float().mean()
    assert set(masks.unique().tolist()) == {0, 1} and 0.03 < coverage < 0.6


def test_labels_outside_num_classes_fail_before_training(compose):
    with pytest.raises(TrainlabError, match=r"train: \d+ labels outside 0..4 "
                                            r"\(data.num_classes=5\): values \[5, 6, 7, 8, 9\]"):
        prepare_data(compose("data.num_classes=5"), {})


def test_no_augmentation_keeps_the_in_memory_fast_path(compose):
    cfg, splits = build_data(compose)
    augmentation = build(cfg.augment, "augment")
    train, val = build_loaders(splits, cfg.data, 0, CPU, augmentation)
    assert isinstance(train, InMemoryLoader) and train.augmentation is None
    plain = build_loaders(splits, cfg.data, 0, CPU)[0]
    for got, want in zip(train, plain, strict=True):
        assert torch.equal(got[0], want[0])


def augmented_batches(splits, cfg, augmentation, epochs=2, workers=2):
    cfg.data.num_workers = workers
    train, _ = build_loaders(splits, cfg.data, int(cfg.seed), CPU, augmentation)
    out = []
    for epoch in range(epochs):
        train.set_epoch(epoch)
        out.append([images for images, _ in train])
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_augmented_batches_repeat_per_seed_and_differ_per_epoch_and_worker(compose, workers):
    """Identical images in: any difference out comes from the augmentation's seeds."""
    cfg = compose("data=shapes", "augment=strong", "data.batch_size=2")
    image = build(cfg.data.dataset, "data").train.tensors[0][0]
    same = torch.utils.data.TensorDataset(image.expand(8, -1, -1, -1).clone(), torch.zeros(8))
    splits = type("S", (), {"train": same, "val": same})()
    runs = [augmented_batches(splits, cfg, build(cfg.augment, "augment"), workers=workers)
            for _ in range(2)]
    for epoch_a, epoch_b in zip(*runs, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(epoch_a, epoch_b, strict=True))
    first, second = runs[0]
    assert not torch.equal(first[0], second[0])  # epochs differ
    assert not torch.equal(first[0], first[1])  # batches (with 2 workers: workers) differ
    assert not torch.equal(first[0][0], first[0][1])  # samples within a batch differ
    cfg.seed = 1
    other = augmented_batches(splits, cfg, build(cfg.augment, "augment"), workers=workers)
    assert not torch.equal(other[0][0], first[0])


def test_validation_is_never_augmented(compose):
    cfg, splits = build_data(compose, "data=shapes", "augment=seg", "data.dataset.n_train=8",
                             "data.dataset.n_val=8", "data.batch_size=8")
    _, val = build_loaders(splits, cfg.data, 0, CPU, build(cfg.augment, "augment"))
    images, masks = next(iter(val))
    assert torch.equal(images, splits.val.tensors[0]) and torch.equal(masks, splits.val.tensors[1])


def test_fashion_mnist_experiment_is_the_course_recipe(compose):
    cfg = compose("experiment=fashion_mnist_cnn")
    assert cfg.data.dataset.name == "fashion_mnist" and cfg.data.batch_size == 256
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.trainer.max_epochs == 20
