"""Real image files through the training loader: trainlab's `image_folder` against a plain
torchvision ImageFolder + DataLoader with the same imgaug pipeline and workers, and the
decoded-image cache (`data.cache`) on epochs after the first.

The benchmark writes its own JPEGs (random smooth colour fields) into a temporary folder.
Loaders alternate epoch by epoch, their order rotating; figures are medians.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
WORKERS = 2
BATCH = 32


def write_jpegs(root: Path, count: int, size: tuple[int, int], classes: int = 4) -> Path:
    """``count`` JPEGs of ``size`` (width, height) in ``classes`` class folders."""
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.BICUBIC)
        image.save(folder / f"{index:05d}.jpg", quality=90)
    return root


def _config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides)


def trainlab_loader(root: Path, augment: str, cache: str | None = None, cache_dir=None):
    """The training loader `trainlab train data=image_folder` builds."""
    from trainlab.components import build
    from trainlab.data.loaders import build_loaders

    cfg = _config(["data=image_folder", f"data.dataset.root={root}", "data.num_classes=4",
                   f"augment={augment}", f"data.num_workers={WORKERS}",
                   f"data.batch_size={BATCH}", "data.dataset.val_fraction=0.01",
                   f"data.cache={cache or 'null'}", f"data.cache_dir={cache_dir or 'null'}"])
    splits = build(cfg.data.dataset, "data")
    augmentation = build(cfg.augment, "augment")
    return build_loaders(splits, cfg.data, 0, torch.device("cpu"), augmentation)[0]


def torchvision_loader(root: Path, augment: str):
    """The plain way: ImageFolder, PIL resize, the same imgaug pipeline, a DataLoader."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from trainlab.components import build

    cfg = _config([f"augment={augment}"])
    augmenter = build(cfg.augment, "augment").augmenter
    size = (64, 64)

    def transform(image: Image.Image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR))
        if augmenter is not None:
            array = augmenter(image=array)
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255

    dataset = ImageFolder(str(root), transform=transform)
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                      persistent_workers=True)


def images_per_second(loader) -> float:
    started = time.perf_counter()
    count = sum(len(images) for images, _ in loader)
    return count / (time.perf_counter() - started)


def alternate(loaders: dict, epochs: int) -> dict[str, list[float]]:
    """images/s of every loader over ``epochs`` epochs after an untimed first one."""
    for loader in loaders.values():
        images_per_second(loader)  # starts the workers; fills a cache
    names = list(loaders)
    speeds: dict[str, list[float]] = {name: [] for name in names}
    for epoch in range(epochs):
        for name in names[epoch % len(names):] + names[: epoch % len(names)]:
            loader = loaders[name]
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch + 1)
            speeds[name].append(images_per_second(loader))
    return speeds


def _table(title: str, speeds: dict[str, list[float]], base: str) -> str:
    lines = [title, "", "| loader | images/s (median) | range | ratio |",
             "| --- | ---: | ---: | ---: |"]
    for name, values in speeds.items():
        ratio = statistics.median(a / b for a, b in zip(values, speeds[base], strict=True))
        lines.append(f"| {name} | {statistics.median(values):,.0f} | "
                     f"{min(values):,.0f}–{max(values):,.0f} | {ratio:.2f}× |")
    return "\n".join(lines) + "\n"


def image_folder_figures(count: int = 2000, epochs: int = 3) -> str:
    torch.set_num_threads(1)
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        photos = write_jpegs(tmp_path / "photos", count, (320, 240))
        speeds = alternate({
            "torchvision ImageFolder + DataLoader": torchvision_loader(photos, "light"),
            "trainlab data=image_folder": trainlab_loader(photos, "light"),
        }, epochs)
        sections.append(_table(
            f"### image_folder: {count} JPEGs of 320×240 → 64×64, augment=light, "
            f"{WORKERS} workers, batch {BATCH}", speeds, "torchvision ImageFolder + DataLoader"))
        large = write_jpegs(tmp_path / "large", count // 2, (1024, 768))
        speeds = alternate({
            "no cache": trainlab_loader(large, "none"),
            "data.cache=memory": trainlab_loader(large, "none", "memory"),
            "data.cache=disk": trainlab_loader(large, "none", "disk", tmp_path / "cache"),
        }, epochs)
        sections.append(_table(
            f"### data.cache on epochs after the first: {count // 2} JPEGs of 1024×768 → "
            f"64×64, augment=none, {WORKERS} workers", speeds, "no cache"))
    return "\n".join(sections)
