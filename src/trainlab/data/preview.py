"""`trainlab preview`: a PNG grid of training images next to their augmented versions.

The same grid is logged to every training run (``preview/augment_preview.png``), so the
MLflow run shows what the model was fed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from trainlab.app import CONFIG_DIR, run_hydra_app
from trainlab.errors import TrainlabError

log = logging.getLogger(__name__)


def preview_batch(dataset, augmentation, n: int, seed: int):
    """The first ``n`` training samples, and the same samples through ``augmentation``."""
    import torch

    from trainlab.data.loaders import epoch_seed

    samples = [dataset[i] for i in range(min(n, len(dataset)))]
    images = torch.stack([torch.as_tensor(image) for image, _ in samples])
    targets = torch.stack([torch.as_tensor(target) for _, target in samples])
    if augmentation is None or not augmentation.enabled:
        return images, targets, images, targets
    augmentation.seed(epoch_seed(seed, 0))
    augmented, augmented_targets = augmentation(images, targets)
    return images, targets, augmented, augmented_targets


def mask_overlay(mask, ignore_index=None):
    """RGBA over an image: class 1 red (binary masks), further classes in tab10's colours,
    ``ignore_index`` grey, background clear."""
    import numpy as np
    from matplotlib import colormaps

    colours = colormaps["tab10"].colors
    overlay = np.zeros((*mask.shape, 4), dtype=np.float32)
    for value in np.unique(mask):
        if value == ignore_index:
            overlay[mask == value] = (0.5, 0.5, 0.5, 0.45)
        elif value > 0:
            rgb = (1.0, 0.0, 0.0) if value == 1 else colours[int(value) % len(colours)]
            overlay[mask == value] = (*rgb, 0.45)
    return overlay


_drawn: dict[str, bytes] = {}  # the PNG of each preview drawn in this process, by its key


def write_preview(splits, augmentation, path: str | Path, n: int = 8, seed: int = 0,
                  key: str | None = None) -> Path:
    """Draw originals (top row) over augmented versions (bottom row) into the PNG ``path``;
    segmentation masks are overlaid in colour (see :func:`mask_overlay`), classification
    labels are the titles. A ``key`` already drawn in this process (the sweep's jobs that
    share data, augmentation and seed) copies that picture instead of drawing it again."""
    path = Path(path)
    if key is not None and key in _drawn:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_drawn[key])
        return path
    drawn = _draw(splits, augmentation, path, n, seed)
    if key is not None:
        _drawn[key] = drawn.read_bytes()
    return drawn


def _draw(splits, augmentation, path: Path, n: int, seed: int) -> Path:
    from trainlab.plots import pyplot, save_figure

    plt = pyplot()
    images, targets, augmented, augmented_targets = preview_batch(
        splits.train, augmentation, n, seed
    )
    count = len(images)
    fig, axes = plt.subplots(2, count, figsize=(1.6 * count, 3.6), squeeze=False)
    for row, (batch, labels, title) in enumerate(
        ((images, targets, "original"), (augmented, augmented_targets, "augmented"))
    ):
        for col in range(count):
            ax = axes[row][col]
            image = batch[col].permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            label = labels[col]
            if label.dim() == 2:  # a segmentation mask
                ax.imshow(mask_overlay(label.numpy(), getattr(augmentation, "ignore_index", None)))
            else:
                names = splits.class_names
                index = int(label)
                ax.set_title(names[index] if index < len(names) else str(index), fontsize=8)
            ax.set_axis_off()
        axes[row][0].text(-0.1, 0.5, title, transform=axes[row][0].transAxes, rotation=90,
                          ha="right", va="center", fontsize=9)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.01, top=0.9, wspace=0.1, hspace=0.3)
    return save_figure(fig, path, tight=False)  # a fixed grid: no layout to measure


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="preview")
def main(cfg: DictConfig) -> None:
    from trainlab.data.check import prepare_data

    choices = hydra.core.hydra_config.HydraConfig.get().runtime.choices
    try:
        data = prepare_data(cfg, choices)
        path = write_preview(data.splits, data.augmentation, cfg.out, int(cfg.n), int(cfg.seed))
    except TrainlabError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {path.resolve()}")


def cli(args: list[str]) -> int:
    """`trainlab preview data=... augment=... [n=8] [out=preview.png]`."""
    return run_hydra_app(main, "preview", args)
