"""Where images come from: each loader returns train and validation datasets."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from trainlab.data.images import IMAGE_SUFFIXES, ImageFiles, MaskClasses, SegmentationFiles
from trainlab.errors import TrainlabError

log = logging.getLogger(__name__)


@dataclass
class DataSplits:
    """The datasets of one data config, and the class names when the source has them.

    ``test`` is a held-out set for ``trainlab eval split=test``, where the source has one."""

    train: Dataset
    val: Dataset
    class_names: list[str] = field(default_factory=list)
    test: Dataset | None = None

    def available(self) -> list[str]:
        """The names of the splits this data has."""
        return [name for name in ("train", "val", "test") if getattr(self, name) is not None]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random train/val split of ``range(n)``: the same seed, the same split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return order[n_val:], order[:n_val]


def load_digits(val_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """scikit-learn's bundled 8x8 digits as (N, 1, 8, 8) floats in [0, 1]; no download."""
    pixels, target = _digits_table()
    images = torch.from_numpy(pixels).reshape(-1, 1, 8, 8) / 16.0
    targets = torch.from_numpy(target)
    train_idx, val_idx = split_indices(len(targets), val_fraction, seed)
    return DataSplits(
        train=TensorDataset(images[train_idx], targets[train_idx]),
        val=TensorDataset(images[val_idx], targets[val_idx]),
        class_names=[str(digit) for digit in range(10)],
    )


def _digits_table() -> tuple[np.ndarray, np.ndarray]:
    """The digits' pixels (float32, N×64) and labels (int64), read straight from the CSV
    scikit-learn ships: importing scikit-learn for it costs over a second per run."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    table = None
    if spec is not None and spec.submodule_search_locations:
        table = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if table is None or not table.is_file():  # another layout: ask scikit-learn itself
        from sklearn.datasets import load_digits as sklearn_digits

        bunch = sklearn_digits()
        return bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    rows = np.loadtxt(table, delimiter=",", dtype=np.float32)
    return np.ascontiguousarray(rows[:, :-1]), rows[:, -1].astype(np.int64)


# ------------------------------------------------------------------ torchvision sources
TORCHVISION = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10"}


def load_torchvision(
    name: str, root: str = "data", download: bool = False
) -> DataSplits:
    """FashionMNIST, MNIST or CIFAR10 through torchvision, held in memory as tensors.

    The source's own train/test split is used as train/val; its test files are also the
    ``test`` split. Without the files and with
    ``download=false`` the error says exactly which files to put where.
    """
    import torchvision

    if name not in TORCHVISION:
        raise TrainlabError(
            f"data: unknown torchvision dataset {name!r}; choose one of {sorted(TORCHVISION)}"
        )
    cls = getattr(torchvision.datasets, TORCHVISION[name])
    root = str(Path(root).expanduser())
    try:
        train, val = (cls(root, train=flag, download=download) for flag in (True, False))
    except Exception as err:  # torchvision raises RuntimeError (missing) or URLError (offline)
        if hasattr(cls, "resources"):
            folder = Path(root) / cls.__name__ / "raw"
            files = [Path(url).name.removesuffix(".gz") for url, _ in cls.resources]
        else:
            folder, files = Path(root) / cls.base_folder, ["data_batch_1..5", "test_batch"]
        how = "could not be downloaded" if download else "is missing or unreadable"
        raise TrainlabError(
            f"data: {cls.__name__} {how} ({err}). Put {', '.join(files)} in {folder}/ "
            f"(torchvision's layout), or set data.download=true where the network allows"
        ) from err
    test = TensorDataset(_images_tensor(val.data), torch.as_tensor(val.targets))
    return DataSplits(
        train=TensorDataset(_images_tensor(train.data), torch.as_tensor(train.targets)),
        val=test, class_names=list(train.classes), test=test,
    )


def _images_tensor(data) -> torch.Tensor:
    """uint8 N×H×W or N×H×W×C (tensor or array) → float N×C×H×W in [0, 1]."""
    images = torch.as_tensor(data)
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return images.float().div_(255).contiguous()


# ---------------------------------------------------------------------- pixel CSVs
def load_pixel_csv(
    train_csv: str,
    val_csv: str | None = None,
    image_size: Sequence[int] = (28, 28),
    label_column: str = "label",
    num_classes: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataSplits:
    """The course's CSV layout: a header, a label column and one column per pixel (0-255).

    Without ``val_csv`` the train file is split by ``seed``.
    """
    train_images, train_labels = _read_pixel_csv(train_csv, image_size, label_column)
    if val_csv:
        val_images, val_labels = _read_pixel_csv(val_csv, image_size, label_column)
    else:
        train_idx, val_idx = split_indices(len(train_labels), val_fraction, seed)
        val_images, val_labels = train_images[val_idx], train_labels[val_idx]
        train_images, train_labels = train_images[train_idx], train_labels[train_idx]
    names = [str(i) for i in range(num_classes or int(train_labels.max()) + 1)]
    return DataSplits(
        TensorDataset(train_images, train_labels), TensorDataset(val_images, val_labels), names
    )


def _read_pixel_csv(path, image_size, label_column):
    path = _existing(path, "CSV file")
    with path.open(encoding="utf-8-sig") as handle:
        header = handle.readline().strip().split(",")
    if label_column not in header:
        raise TrainlabError(
            f"data: {path} has no column {label_column!r}; its header starts {header[:5]}"
        )
    height, width = image_size
    if len(header) - 1 != height * width:
        raise TrainlabError(
            f"data: {path} has {len(header) - 1} pixel columns; image_size {height}x{width} "
            f"needs {height * width}"
        )
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    except ValueError as err:
        raise TrainlabError(f"data: cannot parse {path}: {err}") from err
    column = header.index(label_column)
    labels = torch.from_numpy(table[:, column].astype(np.int64))
    pixels = np.delete(table, column, axis=1).reshape(-1, 1, height, width)
    return torch.from_numpy(pixels / 255.0).float(), labels


# -------------------------------------------------------------------- image files
def load_image_folder(
    root: str,
    val_root: str | None = None,
    test_root: str | None = None,
    image_size: Sequence[int] = (64, 64),
    channels: int = 3,
    num_classes: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    cache: str | None = None,
    cache_dir: str | None = None,
) -> DataSplits:
    """One sub-folder per class (torchvision's ImageFolder layout); no val_root: split by seed.
    ``test_root``, in the same layout, is the held-out ``test`` split.

    The class folders name the classes; a given ``num_classes`` must match their count.
    Files are listed here, read per sample (the data check scans them first).
    """
    from torchvision.datasets import ImageFolder

    def scan(folder: str) -> ImageFolder:
        folder = _existing(folder, "image folder")
        try:
            return ImageFolder(str(folder), loader=Path)  # lists files; we read them ourselves
        except FileNotFoundError as err:
            raise TrainlabError(
                f"data: {err} (in {folder}); every class folder needs at least one image"
            ) from err

    train = scan(root)
    if num_classes is not None and int(num_classes) != len(train.classes):
        raise TrainlabError(
            f"data.num_classes={num_classes} but {root} has {len(train.classes)} class folders "
            f"({', '.join(train.classes[:8])}{', ...' if len(train.classes) > 8 else ''}); "
            f"set data.num_classes={len(train.classes)} or null (inferred from the folders)"
        )
    def same_classes(folder: str) -> list[tuple[Path, int]]:
        found = scan(folder)
        if found.classes != train.classes:
            raise TrainlabError(
                f"data: {folder} has class folders {found.classes}, {root} has {train.classes}; "
                "both need the same class folders"
            )
        return [(Path(p), t) for p, t in found.samples]

    samples = [(Path(p), t) for p, t in train.samples]
    if val_root:
        val_samples = same_classes(val_root)
    else:
        samples, val_samples = _split_list(samples, val_fraction, seed)
    test = ImageFiles(same_classes(test_root), image_size, channels, cache, cache_dir) \
        if test_root else None
    return DataSplits(
        ImageFiles(samples, image_size, channels, cache, cache_dir),
        ImageFiles(val_samples, image_size, channels, cache, cache_dir),
        list(train.classes), test,
    )


def load_csv_images(
    root: str,
    csv: str,
    file_column: str = "file",
    label_column: str = "label",
    image_size: Sequence[int] = (64, 64),
    channels: int = 3,
    num_classes: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    cache: str | None = None,
    cache_dir: str | None = None,
    test_csv: str | None = None,
) -> DataSplits:
    """An image folder plus a CSV of file → label (an integer, or a class name).
    ``test_csv``, in the same form (files in the same folder), is the held-out ``test`` split.

    Class names are the sorted names of the CSV, or 0..n-1 for integer labels, n being
    ``num_classes`` or one more than the largest label. Missing files and labels outside
    the classes are reported by the data check, all at once.
    """
    import csv as csv_module

    def read(path: str) -> tuple[Path, list[dict], list[str]]:
        table = _existing(path, "CSV file")
        with table.open(newline="", encoding="utf-8-sig") as handle:  # Excel writes a BOM
            rows = list(csv_module.DictReader(handle))
        if not rows or file_column not in rows[0] or label_column not in rows[0]:
            found = list(rows[0]) if rows else "no rows"
            raise TrainlabError(
                f"data: {table} needs columns {file_column!r} and {label_column!r}; found {found}"
            )
        return table, rows, [row[label_column].strip() for row in rows]

    folder = _existing(root, "image folder")
    table, rows, raw = read(csv)
    integers = _check_csv_labels(table, raw)
    if integers:
        labels = [int(value) for value in raw]
        names = [str(i) for i in range(num_classes or max(labels) + 1)]
    else:
        names = sorted(set(raw))
        labels = [names.index(value) for value in raw]
        if num_classes is not None and int(num_classes) != len(names):
            raise TrainlabError(
                f"data.num_classes={num_classes} but {table} names {len(names)} classes "
                f"({', '.join(names[:8])}); set data.num_classes={len(names)} or null"
            )
    samples = [(folder / row[file_column], label) for row, label in zip(rows, labels, strict=True)]
    train, val = _split_list(samples, val_fraction, seed)
    test = None
    if test_csv:
        test_table, test_rows, test_raw = read(test_csv)
        # labels as the training CSV reads them: integers, or the names of its classes
        by_name = {name: i for i, name in enumerate(names)}
        unknown = sorted({value for value in test_raw if value not in by_name})
        if unknown:
            raise TrainlabError(f"data: {test_table} has labels {unknown[:8]} that {table} "
                                f"does not; its classes are {names[:8]}")
        test = ImageFiles([(folder / row[file_column], by_name[value])
                           for row, value in zip(test_rows, test_raw, strict=True)],
                          image_size, channels, cache, cache_dir)
    return DataSplits(
        ImageFiles(train, image_size, channels, cache, cache_dir),
        ImageFiles(val, image_size, channels, cache, cache_dir),
        names, test,
    )


def _check_csv_labels(table: Path, raw: list[str]) -> bool:
    """Whether the labels are integers (most of them are), else class names; a blank
    label, or a name among integers, would become a class of its own: refused, naming
    every such line."""
    integer = [value.lstrip("-").isdigit() for value in raw]
    integers = sum(integer) * 2 > len(raw)
    bad = [(line, value) for line, (value, ok) in enumerate(zip(raw, integer, strict=True), 2)
           if (not ok if integers else not value)]
    if bad:
        listed = ", ".join(f"{line} ({value!r})" for line, value in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        kind = "an integer, as the others are" if integers else "a class name"
        raise TrainlabError(f"data: {table} lines {listed}{more}: each label must be {kind}; "
                            "fix or remove those lines")
    return integers


# ------------------------------------------------------------------ segmentation
def load_segmentation_folder(
    root: str,
    images_dir: str = "images",
    masks_dir: str = "masks",
    mask_name: str = "{stem}_mask.gif",
    image_size: Sequence[int] = (256, 256),
    channels: int = 3,
    num_classes: int | None = 1,
    binarize: bool | None = None,
    mask_threshold: int = 128,
    label_map: dict | None = None,
    palette: list | None = None,
    ignore_index: int | None = None,
    val_fraction: float = 0.3,
    seed: int = 0,
    cache: str | None = None,
    cache_dir: str | None = None,
) -> DataSplits:
    """The Carvana layout: ``images/NAME.jpg`` with ``masks/`` + ``mask_name`` (``{stem}``,
    ``{name}``, ``{suffix}`` are filled in); split into train/val by seed.

    ``num_classes: 1`` means binary (one logit, mask 0/1; see
    :class:`~trainlab.data.images.MaskClasses` for how values become classes); ``null``
    infers the classes from ``palette``, ``label_map`` or the masks' values (data check).
    Images without a mask are kept so the data check reports them all.
    """
    folder = _existing(root, "segmentation folder")
    image_folder = _existing(folder / images_dir, "image folder")
    mask_folder = _existing(folder / masks_dir, "mask folder")
    pairs = [
        (image, mask_folder / mask_name.format(stem=image.stem, name=image.name,
                                               suffix=image.suffix))
        for image in sorted(p for p in image_folder.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    ]
    if not pairs:
        raise TrainlabError(f"data: no images in {image_folder} "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    classes = MaskClasses(
        None if num_classes is None else int(num_classes), binarize, int(mask_threshold),
        label_map, palette, ignore_index,
    )
    train, val = _split_list(pairs, val_fraction, seed)
    splits = [SegmentationFiles(items, image_size, channels, classes, cache, cache_dir)
              for items in (train, val)]
    if classes.binary:
        names = ["background", "foreground"]
    else:
        names = [str(i) for i in range(classes.allowed or 0)]
    return DataSplits(*splits, names)


def load_shapes(
    n_train: int = 512,
    n_val: int = 128,
    image_size: Sequence[int] = (64, 64),
    max_shapes: int = 3,
    seed: int = 0,
) -> DataSplits:
    """Random circles, rectangles and triangles on textured backgrounds, with their binary
    masks; generated from ``seed`` alone, so a segmentation experiment runs offline."""
    rng = np.random.default_rng(seed)
    height, width = image_size
    n = n_train + n_val
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = rng.uniform(0.0, 0.6, (n, 3, 1, 1)) + rng.normal(0, 0.12, (n, 3, height, width))
    masks = np.zeros((n, height, width), dtype=np.int64)
    scale = min(height, width)
    for i in range(n):
        for _ in range(rng.integers(1, max_shapes + 1)):
            cy, cx = rng.uniform(0.15, 0.85, 2) * (height, width)
            r = rng.uniform(0.08, 0.22) * scale
            kind = rng.integers(3)
            if kind == 0:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            elif kind == 1:
                ry, rx = rng.uniform(0.5, 1.0, 2) * r
                inside = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
            else:
                angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3
                corners = np.stack([cy + r * np.sin(angles), cx + r * np.cos(angles)], 1)
                inside = _in_triangle(yy, xx, corners)
            colour = rng.uniform(0.4, 1.0, (3, 1))
            images[i][:, inside] = colour + rng.normal(0, 0.03, (3, int(inside.sum())))
            masks[i][inside] = 1
    images_t = torch.from_numpy(np.clip(images, 0, 1)).float()
    masks_t = torch.from_numpy(masks)
    return DataSplits(
        TensorDataset(images_t[:n_train], masks_t[:n_train]),
        TensorDataset(images_t[n_train:], masks_t[n_train:]),
        ["background", "shape"],
    )


def _in_triangle(yy: np.ndarray, xx: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Pixels on the same side of all three edges of the triangle ``corners``."""
    signs = []
    for (y0, x0), (y1, x1) in zip(corners, np.roll(corners, -1, axis=0), strict=True):
        signs.append((xx - x0) * (y1 - y0) - (yy - y0) * (x1 - x0) >= 0)
    return (signs[0] == signs[1]) & (signs[1] == signs[2])


# ------------------------------------------------------------------------ helpers
def _existing(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    exists = path.is_dir() if "folder" in what else path.is_file()
    if not exists:
        raise TrainlabError(f"data: {what} {path} does not exist")
    return path


def _split_list(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    train_idx, val_idx = split_indices(len(items), val_fraction, seed)
    return [items[i] for i in train_idx], [items[i] for i in val_idx]
