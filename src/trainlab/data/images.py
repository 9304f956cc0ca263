"""Image and mask files: decoding (EXIF orientation, 16-bit), mask pixel values → classes,
and the datasets that read them per sample.

Every file is decoded by :func:`_open_image`, so a cache or another decoder wraps one
function.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from trainlab.data.cache import build_cache
from trainlab.errors import TrainlabError

SKIP_HINT = "fix or remove it, or set data.skip_bad_files=true to skip such files"
# Files read as images where a folder is listed (segmentation images, predict's input), as
# torchvision's ImageFolder does for image_folder: notes and .DS_Store are no images.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}
# What PIL raises on a file it cannot read; a decompression bomb (more pixels than PIL's
# limit) is a bad file like any other, not a crash.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as shown, turned by its EXIF orientation: read
    from the header, without decoding."""
    width, height = image.size
    return (height, width) if image.getexif().get(0x0112, 1) in ROTATED else (width, height)


class BadFile(TrainlabError):
    """A file that cannot be read, with its path and PIL's reason kept apart, so each caller
    (the check, training, predict) says what to do about it in its own words."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"data: cannot read image {path} ({reason}); {SKIP_HINT}")
        self.path, self.reason = path, reason


def _open_image(path: Path, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode an image, turned upright by its EXIF orientation; an
    unreadable or truncated file raises :class:`BadFile`.

    ``draft`` (width, height) lets a JPEG decode at the smallest power-of-two scale that
    still covers that size either way up: a large photo bound for a small model decodes
    several times faster, and the resize after it sees the same pixels averaged.
    """
    try:
        image = Image.open(path)
        if draft is not None:
            side = max(draft)
            image.draft(None, (side, side))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # a no-op without an orientation tag
    except UNREADABLE as err:
        raise BadFile(path, str(err)) from err
    return image


def image_tensor(image: Image.Image, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A decoded image → float C×H×W in [0, 1] at ``size`` (width, height), bilinear.

    16-bit images keep their depth: they are scaled by 65535, not clipped at 255.
    """
    if image.mode in WIDE_MODES:
        array = np.asarray(image, dtype=np.float32) / WIDE_MODES[image.mode]
        resized = Image.fromarray(array, mode="F").resize(size, Image.BILINEAR)
        array = np.asarray(resized, dtype=np.float32)[None]
        if channels == 3:
            array = np.repeat(array, 3, axis=0)
        return torch.from_numpy(np.ascontiguousarray(array.clip(0, 1)))
    image = image.convert({1: "L", 3: "RGB"}[int(channels)]).resize(size, Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


class FileDataset(Dataset):
    """Samples decoded from files as they are fetched, so a file the data check passed can
    still fail mid-epoch (``data.check=fast`` reads headers only).

    :meth:`after_check` says how the check ran. With ``data.skip_bad_files`` such a file
    is skipped, said once on stderr, and the next readable sample takes its place, so
    training goes on and repeats; otherwise the error names the file and how to find such
    files before training.
    """

    check_mode = "fast"
    skip_bad_files = False
    found_bad = None  # shared across loader workers: each bad file is said once

    def after_check(self, mode: str, skip: bool) -> None:
        self.check_mode, self.skip_bad_files = mode, skip
        if skip:
            self.found_bad = torch.zeros(len(self), dtype=torch.bool).share_memory_()

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):  # ends iteration over the dataset
            raise IndexError(f"sample {index} of {len(self)}")
        for step in range(len(self)):
            item = (index + step) % len(self)
            if self.found_bad is not None and self.found_bad[item]:
                continue
            try:
                return self.load(item)
            except BadFile as err:
                if not self.skip_bad_files:
                    raise TrainlabError(f"data: cannot read image {err.path} ({err.reason}), "
                                        f"found while training; {self.bad_file_hint()}") from err
                self.found_bad[item] = True
                print(f"data: skipped {err.path} ({err.reason}), found while training "
                      "(data.skip_bad_files=true): the next readable sample takes its place",
                      file=sys.stderr, flush=True)
            except TrainlabError as err:  # a mask value outside the classes, say
                if self.check_mode != "off":
                    raise
                raise TrainlabError(f"{err}; found while training: data.check=off skipped the "
                                    "data check, which finds this before training") from err
        raise TrainlabError("data: no file of this split can be read; every one was skipped "
                            "(data.skip_bad_files=true)")

    def bad_file_hint(self) -> str:
        if self.check_mode == "full":
            return SKIP_HINT
        what = "reads file headers only" if self.check_mode == "fast" else "skips the check"
        return (f"fix or remove it; data.check={self.check_mode} {what}: data.check=full "
                "decodes every file before training, and data.skip_bad_files=true skips "
                "what it finds")


class ImageFiles(FileDataset):
    """Images read from disk per sample: resized (bilinear) to ``image_size``, 1 or 3 channels.

    ``cache`` (``memory`` or ``disk``, see :mod:`trainlab.data.cache`) keeps the decoded,
    resized images so later epochs skip decoding.
    """

    def __init__(self, samples: list[tuple[Path, int]], image_size: Sequence[int], channels: int,
                 cache: str | None = None, cache_dir: str | None = None):
        self.samples = samples
        self.size = (int(image_size[1]), int(image_size[0]))  # PIL wants (width, height)
        self.channels = int(channels)
        shape = (self.channels, self.size[1], self.size[0])
        self.cache = build_cache(cache, len(samples), [(shape, np.float32)],
                                 lambda: f"image {shape}", cache_dir)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[index]
        (pixels,) = self.cache.fetch(index, (path,), lambda: (self.decode(path),))
        return torch.from_numpy(pixels), torch.tensor(label)

    def decode(self, path: Path) -> np.ndarray:
        image = _open_image(path, draft=self.size)
        return image_tensor(image, self.channels, self.size).numpy()


# ------------------------------------------------------------------------------ masks
@dataclass
class MaskClasses:
    """How mask pixel values become class indices.

    ``num_classes`` 1 is a binary task: values ≥ ``threshold`` are foreground (1 in a mask
    holding only 0 and 1), so 0/1, 0/255 and lossy (JPEG) masks all mean what they show.
    Otherwise values are classes as they are, or mapped by ``label_map`` ({pixel value:
    class}) or, for RGB masks, by ``palette`` (colour i is class i). ``ignore_index``
    pixels are kept as they are.
    """

    num_classes: int | None = 1
    binarize: bool | None = None
    threshold: int = 128
    label_map: Mapping | None = None
    palette: Sequence[Sequence[int]] | None = None
    ignore_index: int | None = None

    def __post_init__(self) -> None:
        if self.binarize and self.num_classes not in (None, 1):
            raise TrainlabError(
                f"data.dataset.binarize=true would merge the {self.num_classes} classes of "
                "data.num_classes into one; leave binarize null (binary only when "
                "data.num_classes=1) or map values with data.dataset.label_map"
            )
        self.lut = None
        if self.label_map:
            self.lut = np.full(2**16, -1, dtype=np.int64)
            for value, label in self.label_map.items():
                self.lut[int(value)] = int(label)
        self.colours = None
        if self.palette:
            codes = [_colour_code(np.asarray(colour)) for colour in self.palette]
            self.colours = dict(zip(codes, range(len(codes)), strict=True))

    @property
    def binary(self) -> bool:
        """One logit: values split by the threshold (a data check may infer it)."""
        return self.num_classes == 1 and self.binarize is not False and not (
            self.label_map or self.palette
        )

    @property
    def allowed(self) -> int | None:
        """Classes a mask may hold (binary: 0 and 1); None until inferred."""
        if self.num_classes is not None:
            return max(int(self.num_classes), 2)
        if self.palette:
            return len(self.palette)
        if self.label_map:
            labels = {int(v) for v in self.label_map.values()} - {self.ignore_index}
            return max(labels, default=0) + 1
        return None

    def labels(self, mask: Image.Image, where: Path) -> np.ndarray:
        """A decoded mask → int64 class indices (H×W); values it cannot place name the
        file, the value and the key that fixes it."""
        values = _mask_values(mask, where, self.colours is not None)
        keep = values == self.ignore_index if self.ignore_index is not None else None
        if self.colours is not None:
            labels = _by_palette(values, self.colours, where, keep)
        elif self.lut is not None:
            labels = self.lut[np.clip(values, 0, len(self.lut) - 1)]
            unknown = (labels < 0) if keep is None else (labels < 0) & ~keep
            if unknown.any():
                raise TrainlabError(
                    f"data: mask {where} has value {int(values[unknown][0])}, which "
                    "data.dataset.label_map does not map; add it (or set data.ignore_index)"
                )
        elif self.binary:  # 0/1 masks as they are; 0/255 (or lossy) ones by the threshold
            threshold = self.threshold if values.size and values.max() > 1 else 1
            labels = (values >= threshold).astype(np.int64)
        else:
            labels = values
        if keep is not None:
            labels = np.where(keep, self.ignore_index, labels)
        self.check(labels, where)
        return labels

    def check(self, labels: np.ndarray, where: Path) -> None:
        allowed = self.allowed
        valid = labels if self.ignore_index is None else labels[labels != self.ignore_index]
        if allowed is None or not valid.size or (valid.min() >= 0 and valid.max() < allowed):
            return
        bad = int(valid.max() if valid.max() >= allowed else valid.min())
        raise TrainlabError(
            f"data: mask {where} has class {bad}, outside 0..{allowed - 1} "
            f"(data.num_classes={self.num_classes}); set data.num_classes, map pixel values "
            "with data.dataset.label_map (or data.dataset.palette for colour masks), or mark "
            "them with data.ignore_index"
        )


def _colour_code(rgb: np.ndarray) -> np.ndarray | int:
    rgb = rgb.astype(np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    return int(code) if np.ndim(code) == 0 else code


def _mask_values(mask: Image.Image, where: Path, colour: bool) -> np.ndarray:
    """Pixel values as int64: palette indices for "P" masks, 16-bit values as they are.
    When a palette maps colours, the RGB colour codes each mask shows, a "P" mask's
    through its own palette (its indices need not be the classes)."""
    if colour:
        return _colour_code(np.asarray(mask.convert("RGB")))
    if mask.mode in ("RGB", "RGBA"):
        raise TrainlabError(
            f"data: mask {where} is an RGB colour image; list the class colours in "
            "data.dataset.palette (e.g. [[0,0,0],[128,0,0]]: colour i is class i), or "
            "save masks as single-channel class indices"
        )
    if mask.mode in ("LA", "PA"):
        mask = mask.getchannel(0)
    elif mask.mode not in ("1", "L", "P", *WIDE_MODES):
        mask = mask.convert("L")
    return np.asarray(mask).astype(np.int64)


def _by_palette(codes: np.ndarray, colours: dict, where: Path, keep) -> np.ndarray:
    found, inverse = np.unique(codes, return_inverse=True)
    table = np.array([colours.get(int(code), -1) for code in found], dtype=np.int64)
    unknown = [int(code) for code, label in zip(found, table, strict=True) if label < 0]
    if keep is not None:
        unknown = [code for code in unknown if not (codes[keep] == code).any()]
    if unknown:
        rgb = [(c >> 16, (c >> 8) & 255, c & 255) for c in unknown[:3]]
        raise TrainlabError(
            f"data: mask {where} has colours {rgb} that data.dataset.palette does not list "
            "(masks are read as the colours they show, a palette PNG through its palette)"
        )
    return table[inverse].reshape(codes.shape)


class SegmentationFiles(FileDataset):
    """(image, mask) file pairs → (float C×H×W image, long H×W mask).

    Images resize bilinearly, masks by nearest neighbour so labels stay labels; mask
    values become classes through ``classes`` (:class:`MaskClasses`). ``cache`` keeps both,
    decoded and mapped (see :mod:`trainlab.data.cache`).
    """

    def __init__(self, pairs, image_size, channels, classes: MaskClasses,
                 cache: str | None = None, cache_dir: str | None = None):
        self.pairs = pairs
        self.size = (int(image_size[1]), int(image_size[0]))
        self.channels = int(channels)
        self.classes = classes
        height, width = self.size[1], self.size[0]
        self.cache = build_cache(
            cache, len(pairs), [((self.channels, height, width), np.float32),
                                ((height, width), np.int64)],
            lambda: f"segmentation {self.channels} {self.size} {self.classes!r}", cache_dir,
            files_per_sample=2,
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[index]
        pixels, labels = self.cache.fetch(index, pair, lambda: self.decode(*pair))
        return torch.from_numpy(pixels), torch.from_numpy(labels)

    def decode(self, image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
        image, mask = _open_image(image_path), _open_image(mask_path)
        if image.size != mask.size:
            raise TrainlabError(
                f"data: mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image "
                f"{image_path} is {image.size[0]}x{image.size[1]}"
            )
        labels = self.classes.labels(mask.resize(self.size, Image.NEAREST), mask_path)
        return image_tensor(image, self.channels, self.size).numpy(), labels
