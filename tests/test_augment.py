"""imgaug pipelines from YAML: every augmenter we ship (and a few more) runs on RGB and
grayscale images under NumPy 2, geometric ones keep masks aligned, and previews are written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import CONFIG_DIR, QUICK, runs_of
from trainlab.components import build
from trainlab.data.augment import Augmentation, build_augmenter
from trainlab.errors import TrainlabError

CONTAINERS = {"Sequential", "SomeOf", "OneOf", "Sometimes"}
SHIPPED = sorted(path.stem for path in (CONFIG_DIR / "augment").glob("*.yaml"))


def leaf_augmenters(node) -> list[dict]:
    """Every non-container imgaug augmenter node in a pipeline config."""
    found = []
    if isinstance(node, dict):
        target = str(node.get("_target_", ""))
        if target.startswith("imgaug.augmenters.") and target.rsplit(".", 1)[1] not in CONTAINERS:
            found.append(node)
        for value in node.values():
            found += leaf_augmenters(value)
    elif isinstance(node, list):
        for item in node:
            found += leaf_augmenters(item)
    return found


def shipped_augmenters() -> dict[str, dict]:
    nodes = {}
    for name in SHIPPED:
        config = yaml.safe_load((CONFIG_DIR / "augment" / f"{name}.yaml").read_text())
        for node in leaf_augmenters(config.get("pipeline")):
            nodes[f"{name}:{node['_target_'].rsplit('.', 1)[1]}"] = node
    return nodes


def iaa(name: str, **params) -> dict:
    return {"_target_": f"imgaug.augmenters.{name}", **params}


EXTRA = {
    "ElasticTransformation": iaa("ElasticTransformation", alpha=[5, 10], sigma=2),
    "CropAndPad": iaa("CropAndPad", percent=[-0.2, 0.2]),
    "AddToHueAndSaturation": iaa("AddToHueAndSaturation", value=[-40, 40]),
    "Cutout": iaa("Cutout", nb_iterations=2),
    "CLAHE": iaa("CLAHE"),
    "RandAugment": iaa("RandAugment", n=2, m=[6, 12]),
    "Autocontrast": iaa("pillike.Autocontrast", cutoff=[1, 10]),
}
ALL = {**shipped_augmenters(), **EXTRA}
GEOMETRIC = {"Fliplr", "Flipud", "Affine", "Crop", "CropAndPad", "ElasticTransformation"}


def always(node: dict) -> dict:
    """Make flips fire every time, so a geometric check is never vacuous."""
    return {**node, "p": 1.0} if "p" in node else node


@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "gray"])
@pytest.mark.parametrize("key", sorted(ALL))
def test_augmenter_runs_on_uint8_images(key, channels):
    images = torch.rand(4, channels, 32, 32)
    augmentation = Augmentation(ALL[key])
    augmentation.seed(0)
    out, labels = augmentation(images, torch.arange(4))
    assert out.shape == images.shape and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1 and torch.equal(labels, torch.arange(4))


def geometric_keys():
    return sorted(k for k in ALL if k.split(":")[-1] in GEOMETRIC)


@pytest.mark.parametrize("key", geometric_keys())
def test_geometric_augmenters_move_mask_and_image_together(key):
    """A white square on black with the square as its mask: after augmentation the bright
    pixels must still be the mask's pixels."""
    masks = torch.zeros(4, 48, 48, dtype=torch.long)
    masks[:, 12:30, 16:40] = 1
    images = masks[:, None].float().expand(-1, 3, -1, -1).clone()
    augmentation = Augmentation(always(ALL[key]))
    augmentation.seed(3)
    out, out_masks = augmentation(images, masks)
    bright = out.mean(1) > 0.5
    fg = out_masks == 1
    iou = (bright & fg).sum() / (bright | fg).sum()
    assert iou > 0.85, f"{key}: image/mask IoU {iou:.2f}"
    assert set(out_masks.unique().tolist()) <= {0, 1}
    if key.split(":")[-1] in {"Fliplr", "Flipud"}:
        assert not torch.equal(out_masks, masks)


@pytest.mark.parametrize("option", SHIPPED)
@pytest.mark.parametrize("data", ["digits", "shapes"])
def test_shipped_pipelines_build_and_augment(compose, option, data):
    cfg = compose(f"augment={option}", f"data={data}", "data.dataset.n_train=8"
                  if data == "shapes" else "data.batch_size=8")
    splits = build(cfg.data.dataset, "data")
    augmentation = build(cfg.augment, "augment")
    assert augmentation.enabled == (option != "none")
    images, targets = splits.train.tensors[0][:8], splits.train.tensors[1][:8]
    augmentation.seed(0)
    out, out_targets = augmentation(images, targets)
    assert out.shape == images.shape and out_targets.shape == targets.shape
    assert torch.equal(out, images) == (option == "none")


def test_yaml_lists_are_imgaug_ranges_and_bad_targets_are_named():
    affine = build_augmenter(iaa("Affine", rotate=[-25, 25]))
    assert type(affine.rotate).__name__ == "Uniform"  # (low, high), not a choice of two
    with pytest.raises(TrainlabError, match="cannot import 'imgaug.augmenters.Flipz'"):
        build_augmenter(iaa("Flipz"))
    with pytest.raises(TrainlabError, match="Affine"):
        build_augmenter(iaa("Affine", rotate="sideways"))


def test_preview_command_writes_a_grid(run_trainlab, tmp_path):
    run_trainlab("preview", "data=shapes", "augment=seg", "data.dataset.n_train=8", "out=grid.png")
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > 2 * grid.height  # 8 columns, 2 rows


@pytest.mark.slow
def test_every_job_of_a_sweep_logs_the_preview_of_its_data(run_trainlab, mlflow_client):
    """Jobs sharing data, augmentation and seed share one picture (drawn once per process)."""
    run_trainlab("train", "-m", *QUICK, "augment=light", "optimizer.lr=0.001,0.002")
    jobs = [run for run in runs_of(mlflow_client) if "mlflow.parentRunId" in run.data.tags]
    assert len(jobs) == 2 and all(run.info.status == "FINISHED" for run in jobs)
    pictures = []
    for run in jobs:
        logged = [Path(f.path).name for f in mlflow_client.list_artifacts(run.info.run_id,
                                                                          "preview")]
        assert logged == ["augment_preview.png"]
        assert run.data.params["augment"] == "light"
        path = mlflow_client.download_artifacts(run.info.run_id, "preview/augment_preview.png")
        pictures.append(Path(path).read_bytes())
    assert pictures[0][:4] == b"\x89PNG" and pictures[0] == pictures[1]


ALIGNMENT = {
    "Affine": iaa("Affine", scale=[0.8, 1.2], rotate=[-20, 20], translate_percent=[-0.1, 0.1]),
    "Crop(keep_size)": iaa("Crop", percent=[0, 0.2]),
    "Pad(keep_size)": iaa("Pad", percent=[0, 0.2]),
    "CropAndPad(keep_size)": iaa("CropAndPad", percent=[-0.2, 0.2]),
    "PerspectiveTransform": iaa("PerspectiveTransform", scale=[0.05, 0.1]),
    "Resize": iaa("KeepSizeByResize", children=iaa("Resize", size=[0.6, 0.9])),
    "ElasticTransformation": iaa("ElasticTransformation", alpha=[5, 10], sigma=3),
    "PiecewiseAffine": iaa("PiecewiseAffine", scale=[0.02, 0.04]),
    "ScaleX": iaa("ScaleX", scale=[0.7, 1.3]),
    "ShearY": iaa("ShearY", shear=[-15, 15]),
    "Rot90": iaa("Rot90", k=[1, 3]),
    "Jigsaw": iaa("Jigsaw", nb_rows=4, nb_cols=4, max_steps=1),
}


def centroids(weights: np.ndarray) -> np.ndarray:
    """(N, H, W) non-negative weights → (N, 2) centres of mass (row, column)."""
    yy, xx = np.mgrid[0 : weights.shape[1], 0 : weights.shape[2]]
    total = weights.sum(axis=(1, 2))
    return np.stack([(weights * yy).sum(axis=(1, 2)), (weights * xx).sum(axis=(1, 2))], 1) / (
        total[:, None]
    )


@pytest.mark.parametrize("key", sorted(ALIGNMENT))
def test_masks_stay_pixel_aligned_under_every_geometric_augmenter(key):
    """A bright square and its mask: after augmentation their centres of mass agree to
    sub-pixel accuracy, with no systematic shift (imgaug's nearest-neighbour mask resizes
    used to sit ~0.5 px up-left of the image)."""
    images = np.zeros((12, 64, 64, 3), dtype=np.uint8)
    masks = np.zeros((12, 64, 64), dtype=np.int64)
    images[:, 20:37, 23:44] = 255
    masks[:, 20:37, 23:44] = 1
    augmentation = Augmentation(ALIGNMENT[key])
    augmentation.seed(5)
    out, out_masks = augmentation.augment_arrays(images, masks)
    keep = (out_masks.sum(axis=(1, 2)) > 20) & (out[..., 0].sum(axis=(1, 2)) > 20 * 255)
    errors = centroids(out[keep, ..., 0] / 255.0) - centroids(out_masks[keep].astype(float))
    assert keep.sum() >= 8
    assert np.abs(errors.mean(axis=0)).max() < 0.2, f"{key}: mean shift {errors.mean(axis=0)}"
    limit = 1.2 if key == "Resize" else 0.6  # a mask resized down keeps coarser edges
    assert np.abs(errors).max() < limit, f"{key}: worst shift {np.abs(errors).max():.2f} px"


def test_a_size_change_found_only_while_augmenting_is_one_line():
    """Jigsaw pads images it cannot split evenly, which no check before training can see."""
    augmentation = Augmentation(iaa("Jigsaw", nb_rows=5, nb_cols=5))
    augmentation.check("classification")
    with pytest.raises(TrainlabError, match=r"^augment changed the image size \(32, 32\) → "
                                            r"\(35, 35\); .*KeepSizeByResize$"):
        augmentation(torch.rand(2, 3, 32, 32), torch.arange(2))
