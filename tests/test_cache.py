"""data.cache: decoded images are reused after the first epoch and decoded again when a
file changes; a run with a cache trains and leaves the cache behind for the next run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainlab.data.datasets import load_image_folder, load_segmentation_folder
from trainlab.data.loaders import SeededLoader
from trainlab.errors import TrainlabError


def write_bmp(path: Path, value: int) -> None:
    """A flat 8×8 image; BMP files of one size are always the same number of bytes."""
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(4):
            write_bmp(tmp_path / "train" / label / f"{i}.bmp", 40 * i + (label == "b"))
    return tmp_path / "train"


def epoch_pixels(dataset, workers: int) -> dict[int, float]:
    """{sample index: mean pixel} over one shuffled epoch through a DataLoader."""
    loader = SeededLoader(dataset, 0, batch_size=3, shuffle=False, num_workers=workers)
    images = torch.cat([images for images, _ in loader])
    return {i: round(float(image.mean()) * 255) for i, image in enumerate(images)}


def rewrite_keeping_stamp(path: Path, value: int) -> None:
    """New pixels, same size and modification time: only a cache hit still shows the old ones."""
    stat = path.stat()
    write_bmp(path, value)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("mode, workers", [("memory", 2), ("disk", 0)])
def test_cache_serves_decoded_images_until_a_file_changes(folder, tmp_path, mode, workers):
    splits = load_image_folder(str(folder), image_size=(8, 8), val_fraction=0.25,
                               cache=mode, cache_dir=str(tmp_path / "cache"))
    train = splits.train
    first = epoch_pixels(train, workers)
    path = train.samples[0][0]

    rewrite_keeping_stamp(path, 250)
    assert epoch_pixels(train, workers) == first  # served from the cache, not decoded

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = epoch_pixels(train, workers)
    assert changed[0] == 250  # a newer file is decoded again
    assert {i: v for i, v in changed.items() if i} == {i: v for i, v in first.items() if i}


def test_disk_cache_is_shared_by_later_runs_and_keyed_by_image_size(folder, tmp_path):
    cache_dir = tmp_path / "cache"
    first = load_image_folder(str(folder), image_size=(8, 8), cache="disk",
                              cache_dir=str(cache_dir))
    before = epoch_pixels(first.train, 0)
    assert len(list(cache_dir.rglob("*.raw"))) == len(first.train)

    rewrite_keeping_stamp(first.train.samples[0][0], 250)
    again = load_image_folder(str(folder), image_size=(8, 8), cache="disk",
                              cache_dir=str(cache_dir))
    assert epoch_pixels(again.train, 0) == before  # a new run reads what the first decoded

    other_size = load_image_folder(str(folder), image_size=(4, 4), cache="disk",
                                   cache_dir=str(cache_dir))
    assert other_size.train[0][0].shape == (3, 4, 4)
    assert epoch_pixels(other_size.train, 0)[0] == 250  # another size is another entry

    for entry in cache_dir.rglob("*.raw"):  # a run killed mid-write, a full disk
        entry.write_bytes(entry.read_bytes()[:10])
    assert epoch_pixels(again.train, 0)[0] == 250  # a cut entry is decoded again


def test_segmentation_cache_keeps_image_and_mask_together(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(4):
        write_bmp(tmp_path / "images" / f"{i}.bmp", 30 * i)
        mask = np.zeros((8, 8), dtype=np.uint8)
        mask[: i + 1] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"{i}_mask.png")
    plain = load_segmentation_folder(str(tmp_path), mask_name="{stem}_mask.png",
                                     image_size=(8, 8), val_fraction=0.25)
    cached = load_segmentation_folder(str(tmp_path), mask_name="{stem}_mask.png",
                                      image_size=(8, 8), val_fraction=0.25, cache="memory")
    for _ in range(2):  # decoded, then served from the cache
        for (image, mask), (image_c, mask_c) in zip(plain.train, cached.train, strict=True):
            assert torch.equal(image, image_c) and torch.equal(mask, mask_c)
            assert mask_c.dtype == torch.long and set(mask_c.unique().tolist()) == {0, 1}


def test_an_unknown_cache_mode_is_one_clear_error(folder):
    with pytest.raises(TrainlabError, match=r"data.cache='ram'.*null, memory or disk"):
        load_image_folder(str(folder), image_size=(8, 8), cache="ram")


def test_a_run_with_a_disk_cache_trains_and_fills_the_cache(folder, tmp_path, run_trainlab,
                                                             mlflow_client):
    cache_dir = tmp_path / "decoded"
    run_trainlab("train", "data=image_folder", f"data.dataset.root={folder}",
                 "data.num_classes=2", "data.image_size=[8,8]", "data.cache=disk",
                 f"data.cache_dir={cache_dir}", "augment=light", "model=mlp",
                 "trainer.max_epochs=2", "trainer.progress_bar=false", "logger.log_model=none")
    assert len(list(cache_dir.rglob("*.raw"))) == 8  # train and val samples, once each
    (run,) = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("trainlab")
                                        .experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.cache"] == "disk"
