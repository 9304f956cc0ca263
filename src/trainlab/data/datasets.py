"""Where images come from: each loader returns train and validation datasets."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from trainlab.data.cache import build_cache
from trainlab.errors import TrainlabError

log = logging.getLogger(__name__)


@dataclass
class DataSplits:
    """The datasets of one data config, and the class names when the source has them."""

    train: Dataset
    val: Dataset
    class_names: list[str] = field(default_factory=list)


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

    The source's own train/test split is used as train/val. Without the files and with
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
    return DataSplits(
        train=TensorDataset(_images_tensor(train.data), torch.as_tensor(train.targets)),
        val=TensorDataset(_images_tensor(val.data), torch.as_tensor(val.targets)),
        class_names=list(train.classes),
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
    train_images, train_labels = _read_pixel_csv(train_csv, image_size, label_column, num_classes)
    if val_csv:
        val_images, val_labels = _read_pixel_csv(val_csv, image_size, label_column, num_classes)
    else:
        train_idx, val_idx = split_indices(len(train_labels), val_fraction, seed)
        val_images, val_labels = train_images[val_idx], train_labels[val_idx]
        train_images, train_labels = train_images[train_idx], train_labels[train_idx]
    names = [str(i) for i in range(num_classes or int(train_labels.max()) + 1)]
    return DataSplits(
        TensorDataset(train_images, train_labels), TensorDataset(val_images, val_labels), names
    )


def _read_pixel_csv(path, image_size, label_column, num_classes):
    path = _existing(path, "CSV file")
    with path.open() as handle:
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
    _check_classes(labels, num_classes, str(path))
    pixels = np.delete(table, column, axis=1).reshape(-1, 1, height, width)
    return torch.from_numpy(pixels / 255.0).float(), labels


# -------------------------------------------------------------------- image files
class ImageFiles(Dataset):
    """Images read from disk per sample: resized (bilinear) to ``image_size``, 1 or 3 channels.

    ``cache`` (``memory`` or ``disk``, see trainlab.data.cache) keeps the decoded, resized
    images so later epochs skip decoding.
    """

    def __init__(self, samples: list[tuple[Path, int]], image_size: Sequence[int], channels: int,
                 cache: str | None = None, cache_dir: str | None = None):
        self.samples = samples
        self.size = (int(image_size[1]), int(image_size[0]))  # PIL wants (width, height)
        self.mode = {1: "L", 3: "RGB"}[int(channels)]
        shape = (self.size[1], self.size[0]) + (() if self.mode == "L" else (3,))
        self.cache = build_cache(cache, len(samples), [(shape, np.uint8)],
                                 f"image {self.size} {self.mode}", cache_dir)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[index]
        (pixels,) = self.cache.fetch(index, (path,), lambda: (self.decode(path),))
        return _to_tensor(pixels), torch.tensor(label)

    def decode(self, path: Path) -> np.ndarray:
        image = _open_image(path, draft=(self.mode, self.size))
        return np.asarray(image.convert(self.mode).resize(self.size, Image.BILINEAR))


def load_image_folder(
    root: str,
    val_root: str | None = None,
    image_size: Sequence[int] = (64, 64),
    channels: int = 3,
    val_fraction: float = 0.2,
    seed: int = 0,
    skip_bad_files: bool = False,
    cache: str | None = None,
    cache_dir: str | None = None,
) -> DataSplits:
    """One sub-folder per class (torchvision's ImageFolder layout); no val_root: split by seed."""
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
    samples = _readable([(Path(p), t) for p, t in train.samples], skip_bad_files)
    if val_root:
        val_samples = _readable([(Path(p), t) for p, t in scan(val_root).samples], skip_bad_files)
    else:
        samples, val_samples = _split_list(samples, val_fraction, seed)
    return DataSplits(
        ImageFiles(samples, image_size, channels, cache, cache_dir),
        ImageFiles(val_samples, image_size, channels, cache, cache_dir),
        list(train.classes),
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
    skip_bad_files: bool = False,
    cache: str | None = None,
    cache_dir: str | None = None,
) -> DataSplits:
    """An image folder plus a CSV of file → label (an integer, or a class name)."""
    import csv as csv_module

    folder = _existing(root, "image folder")
    table = _existing(csv, "CSV file")
    with table.open(newline="") as handle:
        rows = list(csv_module.DictReader(handle))
    if not rows or file_column not in rows[0] or label_column not in rows[0]:
        found = list(rows[0]) if rows else "no rows"
        raise TrainlabError(
            f"data: {table} needs columns {file_column!r} and {label_column!r}; found {found}"
        )
    raw = [row[label_column].strip() for row in rows]
    if all(value.lstrip("-").isdigit() for value in raw):
        labels = [int(value) for value in raw]
        names = [str(i) for i in range(num_classes or max(labels) + 1)]
    else:
        names = sorted(set(raw))
        labels = [names.index(value) for value in raw]
    _check_classes(torch.tensor(labels), num_classes, str(table))
    samples = [(folder / row[file_column], label) for row, label in zip(rows, labels, strict=True)]
    missing = [str(path) for path, _ in samples if not path.is_file()]
    if missing and not skip_bad_files:
        raise TrainlabError(
            f"data: {len(missing)} files listed in {table} are missing, e.g. {missing[:3]}"
        )
    samples = _readable(samples, skip_bad_files)
    train, val = _split_list(samples, val_fraction, seed)
    return DataSplits(
        ImageFiles(train, image_size, channels, cache, cache_dir),
        ImageFiles(val, image_size, channels, cache, cache_dir),
        names,
    )


# ------------------------------------------------------------------ segmentation
class SegmentationFiles(Dataset):
    """(image, mask) file pairs → (float C×H×W image, long H×W mask).

    Images resize bilinearly, masks by nearest neighbour so labels stay labels. Mask pixel
    values map through ``lut`` (binarise / label_map); ``ignore_index`` pixels stay as they are.
    ``cache`` keeps both, decoded and mapped (see trainlab.data.cache).
    """

    def __init__(self, pairs, image_size, channels, lut: np.ndarray, allowed: int, ignore_index,
                 cache: str | None = None, cache_dir: str | None = None):
        self.pairs = pairs
        self.size = (int(image_size[1]), int(image_size[0]))
        self.mode = {1: "L", 3: "RGB"}[int(channels)]
        self.lut = lut
        self.allowed = allowed
        self.ignore_index = ignore_index
        height, width = self.size[1], self.size[0]
        image_shape = (height, width) + (() if self.mode == "L" else (3,))
        lut_hash = hashlib.sha1(lut.tobytes()).hexdigest()[:16]
        self.cache = build_cache(
            cache, len(pairs), [(image_shape, np.uint8), ((height, width), np.int32)],
            f"segmentation {self.size} {self.mode} lut={lut_hash} ignore={ignore_index} "
            f"allowed={allowed}", cache_dir, files_per_sample=2,
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[index]
        pixels, labels = self.cache.fetch(index, pair, lambda: self.decode(*pair))
        return _to_tensor(pixels), torch.from_numpy(labels.astype(np.int64, copy=False))

    def decode(self, image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
        image, mask = _open_image(image_path), _open_image(mask_path)
        if image.size != mask.size:
            raise TrainlabError(
                f"data: mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image "
                f"{image_path} is {image.size[0]}x{image.size[1]}"
            )
        if mask.mode not in ("1", "L", "P", "I", "I;16"):
            mask = mask.convert("L")
        mask = mask.resize(self.size, Image.NEAREST)
        labels = self.lut[np.asarray(mask).astype(np.int64)]
        valid = labels if self.ignore_index is None else labels[labels != self.ignore_index]
        if valid.size and (valid.min() < 0 or valid.max() >= self.allowed):
            raise TrainlabError(
                f"data: mask {mask_path} has label {int(valid.max())}, outside "
                f"0..{self.allowed - 1}; set data.num_classes, data.label_map or data.binarize"
            )
        image = image.convert(self.mode).resize(self.size, Image.BILINEAR)
        return np.asarray(image), labels


def load_segmentation_folder(
    root: str,
    images_dir: str = "images",
    masks_dir: str = "masks",
    mask_name: str = "{stem}_mask.gif",
    image_size: Sequence[int] = (256, 256),
    channels: int = 3,
    num_classes: int = 1,
    binarize: bool = True,
    label_map: dict | None = None,
    ignore_index: int | None = None,
    val_fraction: float = 0.3,
    seed: int = 0,
    skip_bad_files: bool = False,
    cache: str | None = None,
    cache_dir: str | None = None,
) -> DataSplits:
    """The Carvana layout: ``images/NAME.jpg`` with ``masks/`` + ``mask_name`` (``{stem}``,
    ``{name}``, ``{suffix}`` are filled in); split into train/val by seed.

    ``num_classes: 1`` means binary (one logit, mask 0/1). ``binarize`` maps every non-zero
    mask value to 1; ``label_map`` ({pixel value: class}) maps values explicitly instead.
    """
    folder = _existing(root, "segmentation folder")
    image_folder = _existing(folder / images_dir, "image folder")
    mask_folder = _existing(folder / masks_dir, "mask folder")
    pairs = []
    for image in sorted(p for p in image_folder.iterdir() if p.is_file()):
        mask = mask_folder / mask_name.format(stem=image.stem, name=image.name, suffix=image.suffix)
        if not mask.is_file():
            if skip_bad_files:
                continue
            raise TrainlabError(
                f"data: image {image} has no mask {mask} (data.mask_name={mask_name!r})"
            )
        pairs.append((image, mask))
    if not pairs:
        raise TrainlabError(f"data: no image with a mask in {image_folder}")
    pairs = _readable(pairs, skip_bad_files)
    lut = np.arange(2**16, dtype=np.int64)
    if binarize and not label_map:
        lut = (lut != 0).astype(np.int64)
    for value, label in (label_map or {}).items():
        lut[int(value)] = int(label)
    if ignore_index is not None and ignore_index < len(lut):
        lut[ignore_index] = ignore_index
    train, val = _split_list(pairs, val_fraction, seed)
    allowed = max(int(num_classes), 2)
    splits = [
        SegmentationFiles(items, image_size, channels, lut, allowed, ignore_index, cache, cache_dir)
        for items in (train, val)
    ]
    binary = int(num_classes) == 1
    names = ["background", "foreground"] if binary else [str(i) for i in range(num_classes)]
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


def _open_image(path: Path, draft: tuple[str, tuple[int, int]] | None = None) -> Image.Image:
    """Open and fully decode an image; an unreadable or truncated file names itself.

    ``draft`` ((mode, (width, height))) lets a JPEG decode at the smallest power-of-two
    scale still at least that size: a large photo bound for a small model decodes several
    times faster, and the resize after it sees the same pixels averaged.
    """
    try:
        image = Image.open(path)
        if draft is not None:
            image.draft(*draft)
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise TrainlabError(
            f"data: cannot read image {path} ({err}); fix or remove it, "
            "or set data.skip_bad_files=true to skip such files"
        ) from err
    return image


def _readable(samples: list[tuple], skip_bad_files: bool) -> list[tuple]:
    """With ``skip_bad_files``, drop (and count) samples whose files do not decode."""
    if not skip_bad_files:
        return samples
    kept, skipped = [], []
    for sample in samples:
        files = [item for item in sample if isinstance(item, Path)]
        try:
            for file in files:
                _open_image(file)
        except TrainlabError:
            skipped.append(sample)
        else:
            kept.append(sample)
    if skipped:
        log.warning("data: skipped %d unreadable files, e.g. %s", len(skipped), skipped[0][0])
    if not kept:
        raise TrainlabError(f"data: all {len(samples)} files are unreadable, e.g. {samples[0][0]}")
    return kept


def _split_list(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    train_idx, val_idx = split_indices(len(items), val_fraction, seed)
    return [items[i] for i in train_idx], [items[i] for i in val_idx]


def _check_classes(labels: torch.Tensor, num_classes: int | None, source: str) -> None:
    if num_classes is None or not labels.numel():
        return
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise TrainlabError(
            f"data: {source} has label {int(bad[0])}, outside data.num_classes={num_classes} "
            f"(allowed 0..{num_classes - 1})"
        )


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))
