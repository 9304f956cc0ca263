"""imgaug on NumPy 2 and OpenCV 5: every augmenter class imgaug ships runs, pickled into a
worker started with ``spawn`` (as DataLoader workers are on macOS and Windows), on uint8 RGB
and grayscale images with a segmentation mask; and each repaired breakage, checked directly."""

from __future__ import annotations

import inspect
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

from trainlab.data.augment import Augmentation, AugmentedDataset
from trainlab.data.imgaug_compat import ia, iaa
from trainlab.data.loaders import SeededLoader

IAA = "imgaug.augmenters."


def node(name: str, **params) -> dict:
    return {"_target_": IAA + name, **params}


# The constructor arguments an augmenter cannot do without (a YAML user writes the same).
SIZE = {"width": 16, "height": 16}
RATIO = {"aspect_ratio": 1.5}
MULTIPLES = {"width_multiple": 5, "height_multiple": 3}
POWERS = {"width_base": 3, "height_base": 2}
REQUIRED = {
    **{f"{where}{how}ToFixedSize": SIZE for where in ("", "Center") for how in ("Crop", "Pad")},
    **{f"{where}{how}ToAspectRatio": RATIO for where in ("", "Center") for how in ("Crop", "Pad")},
    **{f"{where}{how}ToMultiplesOf": MULTIPLES for where in ("", "Center")
       for how in ("Crop", "Pad")},
    **{f"{where}{how}ToPowersOf": POWERS for where in ("", "Center") for how in ("Crop", "Pad")},
    "Resize": {"size": 0.5},
    "AssertShape": {"shape": [None, None, None, 3]},
    "BlendAlphaBoundingBoxes": {"labels": "car"},
    "BlendAlphaCheckerboard": {"nb_rows": 2, "nb_cols": 3},
    "BlendAlphaMask": {"mask_generator": node("HorizontalLinearGradientMaskGen")},
    "BlendAlphaRegularGrid": {"nb_rows": 2, "nb_cols": 3},
    "BlendAlphaSegMapClassIds": {"class_ids": 1},
    "ChangeColorspace": {"to_colorspace": "HSV"},
    "CloudLayer": {
        "intensity_mean": 200, "intensity_freq_exponent": -1.5, "intensity_coarse_scale": 2,
        "alpha_min": 0.2, "alpha_multiplier": 0.8, "alpha_size_px_max": 8,
        "alpha_freq_exponent": -2.0, "sparsity": 0.9, "density_multiplier": 0.6,
    },
    "Jigsaw": {"nb_rows": 4, "nb_cols": 4},  # 32 px splits evenly: no padding
    "KeepSizeByResize": {"children": node("Crop", px=[0, 4], keep_size=False)},
    "OneOf": {"children": [node("Fliplr"), node("Flipud")]},
    "RainLayer": {
        "density": 0.1, "density_uniformity": 0.5, "drop_size": 0.5,
        "drop_size_uniformity": 0.5, "angle": 0, "speed": 0.1, "blur_sigma_fraction": 0.001,
    },
    "RemoveCBAsByOutOfImageFraction": {"fraction": 0.5},
    "ReplaceElementwise": {"mask": 0.1, "replacement": 0},
    "SaveDebugImageEveryNBatches": {"destination": "{tmp}", "interval": 1},
    "SnowflakesLayer": {
        "density": 0.05, "density_uniformity": 0.5, "flake_size": 0.5,
        "flake_size_uniformity": 0.5, "angle": 0, "speed": 0.01, "blur_sigma_fraction": 0.0001,
    },
    "Voronoi": {"points_sampler": node("RegularGridPointsSampler", n_rows=3, n_cols=3)},
    "WithColorspace": {"to_colorspace": "HSV", "children": node("Add", value=10)},
    "WithPolarWarping": {"children": node("Affine", rotate=10)},
}
# Augmenters whose output size differs from their input: run the way a pipeline must use
# them, inside KeepSizeByResize (trainlab refuses size changes otherwise).
SIZE_CHANGING_MODULES = {"size", "pooling"}
KEEPS_SIZE = {"Crop", "Pad", "CropAndPad", "KeepSizeByResize"}
# The abstract base, and a blend that needs bounding boxes (trainlab's data has none).
NOT_AUGMENTERS = {"Augmenter", "BlendAlphaBoundingBoxes"}
# imgaug applies these to images only and refuses a batch with masks (trainlab refuses
# them on segmentation data): run on images alone.
IMAGE_ONLY = {"pillike.Affine", "RandAugment"}


def all_augmenter_classes() -> dict[str, type]:
    found = {}
    for module, prefix in ((iaa, ""), (iaa.pillike, "pillike."), (iaa.imgcorruptlike,
                                                                   "imgcorruptlike.")):
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if (issubclass(cls, iaa.Augmenter) and not name.startswith("_")
                    and name not in NOT_AUGMENTERS):
                found[prefix + name] = cls
    return found


CLASSES = all_augmenter_classes()


def pipeline_for(key: str, cls: type, tmp: str) -> dict:
    params = {k: (v.format(tmp=tmp) if isinstance(v, str) else v)
              for k, v in REQUIRED.get(key, {}).items()}
    if key.startswith("BlendAlpha"):  # blends need something to blend in
        params["foreground"] = node("Add", value=40)
    leaf = node(key, **params)
    if cls.__module__.rsplit(".", 1)[1] in SIZE_CHANGING_MODULES and key not in KEEPS_SIZE:
        return node("KeepSizeByResize", children=leaf)
    return leaf


def augment_in_worker(augmentation: Augmentation, with_masks: bool) -> list[tuple]:
    """Run in a spawned process: the augmentation arrived pickled. Returns what the test
    checks for RGB and grayscale: shapes, dtypes and the mask's values."""
    rng = np.random.default_rng(0)
    out = []
    for channels in (3, 1):
        images = rng.integers(0, 256, (2, 32, 32, channels), dtype=np.uint8)
        masks = np.zeros((2, 32, 32), dtype=np.int64)
        masks[:, 8:20, 10:26] = 1
        augmentation.seed(0)
        images_aug, masks_aug = augmentation.augment_arrays(images, masks if with_masks else None)
        masks_aug = masks if masks_aug is None else masks_aug
        out.append((images_aug.shape, images_aug.dtype, masks_aug.shape,
                    sorted(np.unique(masks_aug).tolist())))
    return out


@pytest.fixture(scope="module")
def spawn_pool():
    """One process started with ``spawn`` for every augmenter: nothing is inherited, so
    each pipeline must pickle, and imgaug is imported afresh through trainlab."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.mark.parametrize("key", sorted(CLASSES))
def test_every_imgaug_augmenter_runs_pickled_in_a_spawned_worker(key, spawn_pool, tmp_path):
    augmentation = Augmentation(pipeline_for(key, CLASSES[key], str(tmp_path)))
    with_masks = key not in IMAGE_ONLY and not key.startswith("imgcorruptlike.")
    results = spawn_pool.submit(augment_in_worker, augmentation, with_masks).result(timeout=120)
    for (shape, dtype, mask_shape, mask_values), channels in zip(results, (3, 1), strict=True):
        assert shape == (2, 32, 32, channels) and dtype == np.uint8
        assert mask_shape == (2, 32, 32) and set(mask_values) <= {0, 1}


def test_autocontrast_and_randaugment_train_in_spawned_dataloader_workers():
    """The pipelines that held a local function before: a real DataLoader with spawn."""
    images = torch.rand(8, 3, 24, 24)
    dataset = AugmentedDataset(
        torch.utils.data.TensorDataset(images, torch.arange(8)),
        Augmentation(node("Sequential", children=[
            node("pillike.Autocontrast", cutoff=[2, 10]), node("RandAugment", n=2, m=[6, 12]),
        ])),
    )
    loader = SeededLoader(dataset, 0, batch_size=4, num_workers=1,
                          multiprocessing_context="spawn")
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(4, 3, 24, 24)] * 2
    assert not torch.equal(torch.cat([b[0] for b in batches]), images)


def test_polar_warping_moves_keypoints_boxes_and_polygons():
    """OpenCV 5's cartToPolar returns 1-D arrays; imgaug expected OpenCV 4's N×1."""
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    kps = ia.KeypointsOnImage([ia.Keypoint(20, 16)], shape=image.shape)
    boxes = ia.BoundingBoxesOnImage([ia.BoundingBox(4, 4, 12, 12)], shape=image.shape)
    polygons = ia.PolygonsOnImage([ia.Polygon([(2, 2), (20, 3), (10, 20)])], shape=image.shape)
    aug = iaa.WithPolarWarping(iaa.Affine(translate_px={"x": 0}))  # a round trip
    _, kps_aug, boxes_aug, polys_aug = aug(
        image=image, keypoints=kps, bounding_boxes=boxes, polygons=polygons
    )
    assert np.allclose(kps_aug.to_xy_array(), [[20, 16]], atol=0.5)
    assert np.allclose(boxes_aug.to_xyxy_array(), [[4, 4, 12, 12]], atol=1.0)
    assert np.allclose(polys_aug.polygons[0].exterior, polygons.polygons[0].exterior, atol=1.0)


@pytest.mark.parametrize("augmenter", [
    iaa.Add(10), iaa.Multiply(1.2), iaa.GammaContrast(1.5),
    iaa.Invert(1.0), iaa.GaussianBlur(1.0), iaa.AverageBlur(3), iaa.MedianBlur(3),
    iaa.Fliplr(1.0), iaa.Resize(0.5),
], ids=lambda aug: type(aug).__name__)
def test_images_with_more_than_128_channels(augmenter):
    """OpenCV 5 takes at most 128 channels per call (OpenCV 4: 512); each channel must come
    out as it would alone."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, (16, 16, 300), dtype=np.uint8)
    image[..., 150] = image[..., 0]  # same input, same output (no per-channel randomness)
    out = augmenter.to_deterministic()(image=image)
    assert out.shape[2] == 300 and out.dtype == np.uint8
    single = augmenter.to_deterministic()(image=image[..., :3])
    assert np.array_equal(out[..., 150], out[..., 0])
    assert np.array_equal(out[..., 0], single[..., 0])


def test_color_temperature_changes_a_batch_of_images():
    images = np.full((4, 8, 8, 3), 128, dtype=np.uint8)
    out = iaa.ChangeColorTemperature(kelvin=2000)(images=images)
    assert out.shape == images.shape and (out[..., 0] > out[..., 2]).all()  # warmer: redder


def test_with_channels_on_images_without_channels():
    empty = np.zeros((4, 4, 0), dtype=np.uint8)
    assert iaa.WithChannels([0], iaa.Add(10))(image=empty).shape == (4, 4, 0)


def test_cubic_elastic_transformation_keeps_float64_beyond_float32_range():
    image = np.full((16, 16, 3), 1e39)
    out = iaa.ElasticTransformation(alpha=5, sigma=1, order=3, mode="nearest")(image=image)
    assert out.dtype == np.float64 and np.isfinite(out).all()
    assert np.allclose(out, 1e39, rtol=1e-3)


def test_the_compat_layer_pickles_without_local_functions():
    for augmenter in (iaa.pillike.Autocontrast(cutoff=(1, 10)), iaa.RandAugment()):
        clone = pickle.loads(pickle.dumps(augmenter))
        assert type(clone) is type(augmenter)
