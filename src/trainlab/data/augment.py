"""imgaug pipelines written in YAML, applied to float tensors (and segmentation masks).

A pipeline node is built by :func:`build_augmenter`: any imgaug augmenter (or parameter) by
``_target_``; a YAML list of numbers becomes a tuple, imgaug's ``(low, high)`` range, and a
list of augmenters stays a list (the children of ``Sequential``, ``SomeOf``, ``OneOf``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from trainlab.data.imgaug_compat import SegmentationMapsOnImage, iaa
from trainlab.errors import TrainlabError


def build_augmenter(node: Any) -> Any:
    """Recursively build an imgaug object from a config node (see the module docstring)."""
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        kwargs = {key: build_augmenter(value) for key, value in node.items() if key != "_target_"}
        if "_target_" not in node:
            return kwargs
        try:
            target = get_object(node["_target_"])
        except Exception as err:
            raise TrainlabError(
                f"augment: cannot import {node['_target_']!r}; use an imgaug class such as "
                "imgaug.augmenters.Fliplr"
            ) from err
        try:
            return target(**kwargs)
        except (TypeError, ValueError, AssertionError) as err:
            raise TrainlabError(f"augment: {node['_target_']}({kwargs}) failed: {err}") from err
    if isinstance(node, list):
        items = [build_augmenter(item) for item in node]
        numeric = items and all(type(i) in (int, float) for i in items)
        return tuple(items) if numeric else items
    return node


# Augmenters imgaug applies to images only (it refuses a batch with masks), with the fix.
IMAGE_ONLY = (
    (iaa.RandAugment, "compose its parts from imgaug.augmenters (Affine, Sharpen, ...)"),
    (iaa.pillike.Affine, "use imgaug.augmenters.Affine, which moves the mask too"),
    (iaa.imgcorruptlike._ImgcorruptAugmenterBase, "use its imgaug.augmenters counterpart"),
)


def augmenter_name(augmenter: Any) -> str:
    """``Fliplr``, ``pillike.Affine``, ``imgcorruptlike.Fog``: the name a YAML file uses."""
    module = type(augmenter).__module__.rsplit(".", 1)[-1]
    prefix = f"{module}." if module in ("pillike", "imgcorruptlike") else ""
    return prefix + type(augmenter).__name__


def check_pipeline(augmenter: Any, task: str, inside_keep_size: bool = False) -> None:
    """Refuse, in one line naming the augmenter and the fix, a pipeline whose output size
    differs from its input (batches and masks need one size) or that holds image-only
    augmenters on segmentation data (the mask would no longer match the image)."""
    name = augmenter_name(augmenter)
    if task == "segmentation":
        for kind, fix in IMAGE_ONLY:
            if isinstance(augmenter, kind):
                raise TrainlabError(
                    f"augment: {name} changes images only (imgaug cannot apply it to masks), "
                    f"so it cannot run on segmentation data; {fix}"
                )
    keeps = isinstance(augmenter, iaa.KeepSizeByResize)
    if not (inside_keep_size or keeps):
        sizing = type(augmenter).__module__.rsplit(".", 1)[-1] in ("size", "pooling")
        keep_size = getattr(augmenter, "keep_size", None)
        # fit_output grows the image to hold all of it, unless keep_size resizes it back
        fits = getattr(augmenter, "fit_output", False) and keep_size is not True
        if keep_size is False or fits or (sizing and keep_size is None):
            fix = ("set fit_output: false, or " if fits and keep_size is None
                   else "set keep_size: true, or " if keep_size is False else "")
            raise TrainlabError(
                f"augment: {name} changes the image size, but every image of a batch (and "
                f"its mask) keeps data.image_size; {fix}wrap it in "
                "imgaug.augmenters.KeepSizeByResize"
            )
    for children in augmenter.get_children_lists():
        for child in children:
            check_pipeline(child, task, inside_keep_size or keeps)


class Augmentation:
    """An imgaug pipeline applied to batches or samples of float images in [0, 1].

    Images go to imgaug as uint8 HxWxC (grayscale is widened to RGB and back, so colour
    augmenters work on it too); masks as ``SegmentationMapsOnImage``, so geometric
    augmenters move image and mask together. Pixels a geometric augmenter brings in from
    outside the image (padding, rotation corners) get ``ignore_index`` when it is set (else
    class 0). ``pipeline=None`` is the identity.
    """

    def __init__(self, pipeline: Any = None, ignore_index: int | None = None) -> None:
        self.augmenter = None if pipeline is None else build_augmenter(pipeline)
        if self.augmenter is not None and not isinstance(self.augmenter, iaa.Augmenter):
            raise TrainlabError(
                f"augment.pipeline must build an imgaug augmenter, got {type(self.augmenter)}"
            )
        self.ignore_index = ignore_index

    def check(self, task: str) -> None:
        """See :func:`check_pipeline`; the identity fits every task."""
        if self.augmenter is not None:
            check_pipeline(self.augmenter, task)

    @property
    def enabled(self) -> bool:
        return self.augmenter is not None

    def seed(self, seed: int) -> None:
        """Reseed the pipeline and every child: the same seed, the same augmentations."""
        if self.augmenter is not None:
            self.augmenter.seed_(seed)

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one sample (C×H×W) or a batch (N×C×H×W); masks follow images."""
        if self.augmenter is None:
            return images, targets
        single = images.dim() == 3
        batch = images.unsqueeze(0) if single else images
        masks = targets.unsqueeze(0) if single else targets
        masks = masks.cpu().numpy() if masks.dim() == 3 else None  # classification: labels
        out_images, out_masks = self.augment_arrays(to_uint8(batch), masks)
        new_images = from_uint8(out_images, batch.dtype)
        if out_masks is not None:
            targets = torch.from_numpy(out_masks).to(targets.dtype)
            targets = targets[0] if single else targets
        return (new_images[0] if single else new_images), targets

    def augment_arrays(
        self, images: np.ndarray, masks: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 N×H×W×C images (and int N×H×W masks) through imgaug, same shapes back."""
        gray = images.shape[-1] == 1
        rgb = np.repeat(images, 3, axis=-1) if gray else images
        out_masks = None
        if masks is None:
            augmented = self.augmenter(images=list(rgb))
        else:
            # imgaug fills uncovered mask pixels with 0: shift classes up by one so 0 marks
            # them, and give them ignore_index afterwards
            shift = 0 if self.ignore_index is None else 1
            segmaps = [
                SegmentationMapsOnImage(mask.astype(np.int32) + shift, shape=image.shape)
                for image, mask in zip(rgb, masks, strict=True)
            ]
            augmented, augmented_maps = self.augmenter(images=list(rgb), segmentation_maps=segmaps)
        sizes = sorted({tuple(image.shape[:2]) for image in augmented})
        if sizes != [tuple(images.shape[1:3])]:
            raise TrainlabError(
                f"augment changed the image size {tuple(images.shape[1:3])} → "
                f"{', '.join(map(str, sizes))}; every image of a batch keeps data.image_size: "
                "wrap the augmenter in imgaug.augmenters.KeepSizeByResize"
            )
        out = np.stack(augmented)
        if masks is not None:
            out_masks = np.stack([m.get_arr() for m in augmented_maps]).astype(masks.dtype)
            if shift:
                out_masks = np.where(out_masks == 0, self.ignore_index, out_masks - shift)
        if gray:
            out = np.round(out.astype(np.float32).mean(axis=-1, keepdims=True)).astype(np.uint8)
        return out, out_masks


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N×C×H×W floats in [0, 1] → N×H×W×C uint8, imgaug's native format."""
    scaled = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).numpy()


def from_uint8(images: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N×H×W×C uint8 → N×C×H×W floats in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(dtype) / 255


class AugmentedDataset(torch.utils.data.Dataset):
    """A training split whose samples pass through ``augmentation`` (one per __getitem__)."""

    def __init__(self, dataset: torch.utils.data.Dataset, augmentation: Augmentation) -> None:
        self.dataset = dataset
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = self.dataset[index]
        return self.augmentation(image, torch.as_tensor(target))
