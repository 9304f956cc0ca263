"""The data check: every file, mask and label of a data config scanned before training, and
the classes inferred where the config leaves them out.

`trainlab data check data=... [augment=...]` prints the report; `trainlab train` runs the
same scan before any MLflow run exists. ``data.check: fast`` reads file headers and sizes
(and checks each file's end, so a truncated JPEG/PNG/GIF shows) and the values of masks
that hold classes; ``full`` decodes every image and mask; ``off`` skips the scan. Every
problem is listed in one report. With ``data.skip_bad_files`` unreadable, missing and
mismatched files are left out instead (and listed), but labels outside the classes always
stop the run.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, open_dict
from PIL import Image

from trainlab.app import CONFIG_DIR, run_hydra_app
from trainlab.data.images import (
    UNREADABLE,
    BadFile,
    FileDataset,
    _mask_values,
    _open_image,
    upright_size,
)
from trainlab.errors import TrainlabError

log = logging.getLogger(__name__)

MODES = ("fast", "full", "off")
# What a complete file ends with; a download or copy cut short lacks it.
ENDINGS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",), "GIF": (b";",)}
SHOWN = 200  # problems listed in full; the rest are counted


@dataclass
class DataReport:
    """What the scan found: class counts per split, every problem, every skipped file."""

    source: str
    mode: str
    class_names: list[str]
    num_classes: int | None
    inferred: bool
    counts: dict[str, Counter] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    unit: str = "labels"
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bad_files: int = 0  # problems that data.skip_bad_files would leave out
    files: bool = True  # read from files (else held in memory)
    mask_values: bool = False  # the fast check read the masks' values (classes, not binary)
    binary_values: set[int] = field(default_factory=set)  # raw values of binary masks, while
    # none reaches the threshold: then class indices (0/1/2) would all read as background

    def text(self) -> str:
        """The report as a person reads it: classes, a table of counts, the problems."""
        read = ", mask values" if self.mask_values else ""
        how = {"fast": f"file headers and sizes{read}; data.check=full decodes every file",
               "full": "every file decoded", "off": "not scanned (data.check=off)"}[self.mode]
        if not self.files and self.mode != "off":
            how = "in memory: every label checked"
        origin = "inferred from the data" if self.inferred else "data.num_classes"
        if self.unit == "pixels" and self.num_classes == 1:
            origin += ", binary: one logit"
        names = ", ".join(self.class_names[:12]) + (", ..." if len(self.class_names) > 12 else "")
        lines = [f"data check of {self.source} ({how})",
                 f"  classes: {self.num_classes} ({origin}): {names}"]
        any_counts = any(self.counts.values())
        columns = self.class_names if any_counts and len(self.class_names) <= 12 else []
        header = ["split", "images", *columns]
        rows = [[split, str(self.sizes[split]), *(str(self.counts[split].get(i, 0))
                                                   for i in range(len(columns)))]
                for split in self.sizes]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
            lines.append("  " + "  ".join(cells))
        if columns and self.unit == "pixels":
            lines.append("  (class columns count mask pixels)")
        if self.skipped:
            lines.append(f"  skipped {counted(len(self.skipped), 'file')} "
                         "(data.skip_bad_files=true):")
            lines += [f"    {item}" for item in self.skipped[:SHOWN]]
        if self.problems:
            lines.append(f"  {counted(len(self.problems), 'problem')}:")
            lines += [f"    {item}" for item in self.problems[:SHOWN]]
        if len(self.problems) > SHOWN:
            lines.append(f"    ... and {len(self.problems) - SHOWN} more")
        if not self.problems and not self.skipped:
            lines.append("  no problems found")
        return "\n".join(lines)


def counted(count: int, noun: str) -> str:
    """``1 problem``, ``2 problems``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


@dataclass
class PreparedData:
    """Checked splits, the checked augmentation and the report: what training builds on."""

    splits: object
    augmentation: object
    report: DataReport


def prepare_data(cfg: DictConfig, choices: dict) -> PreparedData:
    """Build ``cfg.data`` and ``cfg.augment``, check the augmenters against the task, scan
    the data, write inferred classes into ``cfg.data.num_classes`` and leave out bad files
    (``data.skip_bad_files``) — or raise one TrainlabError holding the whole report."""
    from trainlab.components import build

    mode = str(cfg.data.get("check", "fast"))
    if mode not in MODES:
        raise TrainlabError(f"data.check={mode!r}; choose one of {', '.join(MODES)}")
    source = f"conf/data/{choices.get('data')}.yaml" if choices.get("data") else "data"
    splits = build(cfg.data.dataset, "data", choices.get("data"))
    augmentation = build(cfg.augment, "augment", choices.get("augment"))
    if getattr(augmentation, "check", None):
        augmentation.check(str(cfg.data.task))
    skip = bool(cfg.data.get("skip_bad_files", False))
    report = scan(splits, cfg.data.get("num_classes"), str(cfg.data.task), mode, source, skip)
    if report.problems:
        hint = ("fix or remove these files, or set data.skip_bad_files=true to leave them out"
                if report.bad_files else "set data.num_classes, or fix the labels")
        raise TrainlabError(f"data: {counted(len(report.problems), 'problem')} found before "
                            "training\n"
                            f"{report.text()}\n{hint}")
    if cfg.data.get("num_classes") is None:
        with open_dict(cfg.data):
            cfg.data.num_classes = report.num_classes
    return PreparedData(splits, augmentation, report)


def check_split(cfg: DictConfig, splits, split: str) -> DataReport:
    """Scan the one split that ``trainlab eval`` reads as training scans its splits: a bad
    file is refused in one line naming it, or left out with ``data.skip_bad_files=true``
    (``report.skipped`` lists it)."""
    mode = str(cfg.data.get("check", "fast"))
    skip = bool(cfg.data.get("skip_bad_files", False))
    report = scan(splits, cfg.data.get("num_classes"), str(cfg.data.task), mode, "data", skip,
                  names=(split,))
    if report.problems:
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        hint = ("; fix or remove it, or set data.skip_bad_files=true to leave such files out"
                if report.bad_files else "")
        raise TrainlabError(f"data: {split} split: {report.problems[0]}{more}{hint}")
    return report


def scan(splits, num_classes, task: str, mode: str, source: str, skip: bool,
         names: tuple[str, ...] = ("train", "val")) -> DataReport:
    """Scan the splits ``names`` of ``splits`` (see the module docstring), then tell their
    file datasets how, for a bad file found only while training."""
    report = _scan_splits(splits, num_classes, task, mode, source, skip, names)
    for split in names:
        dataset = getattr(splits, split)
        if isinstance(dataset, FileDataset):
            dataset.after_check(mode, skip)
    return report


def _scan_splits(splits, num_classes, task, mode, source, skip, names) -> DataReport:
    segmentation = task == "segmentation"
    classes = getattr(splits.train, "classes", None)  # MaskClasses of file-based masks
    given = None if num_classes is None else int(num_classes)
    report = DataReport(source, mode, list(splits.class_names), given, given is None,
                        unit="pixels" if segmentation else "labels")
    if mode == "off":
        if classes is not None and classes.allowed is None:
            raise TrainlabError(
                "data.num_classes=null reads the classes from the masks, which data.check=off "
                "skips; set data.num_classes, or data.check=fast"
            )
        report.sizes = {split: len(getattr(splits, split)) for split in names}
        report.num_classes = given or len(splits.class_names)
        return report
    if classes is not None and classes.num_classes is None:
        _infer_mask_classes(splits, classes)
    for split in names:
        dataset = getattr(splits, split)
        counts: Counter = Counter()
        if hasattr(dataset, "pairs"):
            _scan_pairs(dataset, split, mode == "full", counts, report, skip)
        elif hasattr(dataset, "samples"):
            _scan_samples(dataset, split, mode == "full", counts, report, skip)
        elif hasattr(dataset, "tensors") and len(dataset.tensors) > 1:
            report.files = False
            counts.update(np.asarray(dataset.tensors[1]).ravel().tolist())
        report.counts[split] = counts
        report.sizes[split] = len(dataset)
    _settle_classes(report, splits, classes, segmentation)
    return report


LOSSY_SUFFIXES = (".jpg", ".jpeg")  # mask values blur at edges: not class indices


def _infer_mask_classes(splits, classes) -> None:
    """num_classes null on masks: from the palette, the label map or the masks' values;
    values 0 and 1, or 0 and one value at least the threshold (0/255), are binary. A mask
    that does not read is passed over: the scan after this lists it."""
    if classes.allowed is None:
        values: set[int] = set()
        for dataset in (splits.train, splits.val):
            for _, mask_path in _progress(dataset.pairs, "reading masks for their classes"):
                try:
                    labels = classes.labels(_open_image(mask_path), mask_path)
                except BadFile:
                    continue
                values.update(np.unique(labels).tolist())
        values.discard(classes.ignore_index)
        found = values - {0}
        binary = found <= {1} or (len(found) == 1 and min(found) >= classes.threshold)
        lossy = [path for dataset in (splits.train, splits.val) for _, path in dataset.pairs
                 if Path(path).suffix.lower() in LOSSY_SUFFIXES]
        if lossy and not binary:
            raise TrainlabError(
                f"data.num_classes=null: masks such as {lossy[0]} are JPEG, whose compression "
                f"leaves {len(values)} distinct values where classes were drawn; set "
                "data.num_classes=1 for binary masks (split at data.dataset.mask_threshold="
                f"{classes.threshold}) or the number of classes, or save the masks as PNG")
        classes.num_classes = 1 if binary else max(values) + 1
    else:
        classes.num_classes = classes.allowed
    splits.class_names[:] = ["background", "foreground"] if classes.binary else [
        str(i) for i in range(classes.num_classes)]


def _settle_classes(report: DataReport, splits, classes, segmentation: bool) -> None:
    """The class count (given or inferred) and every label outside it."""
    if classes is not None:
        inferred = classes.num_classes
    elif segmentation:
        found = [v for split in report.counts.values() for v in split if v != _ignore(splits)]
        inferred = 1 if set(found) <= {0, 1} else max(found, default=0) + 1
    else:
        found = [v for split in report.counts.values() for v in split]
        inferred = len(splits.class_names) or max(found, default=-1) + 1
    report.num_classes = report.num_classes or inferred
    report.class_names = report.class_names or list(splits.class_names) or [
        str(i) for i in range(report.num_classes)]
    allowed = max(report.num_classes, 2) if segmentation else report.num_classes
    values = sorted(report.binary_values - {0})
    if values and values[-1] > 1 and values[-1] < classes.threshold:
        report.problems.append(
            f"masks hold values {', '.join(map(str, values[:10]))}, all below "
            f"data.dataset.mask_threshold={classes.threshold}, so every pixel reads as "
            f"background: if they are class indices set data.num_classes={values[-1] + 1}, "
            "else lower data.dataset.mask_threshold"
        )
    for split, counts in report.counts.items():
        bad = sorted(v for v in counts if (v < 0 or v >= allowed) and v != _ignore(splits))
        if bad and not report.files:  # files are named one by one as they are scanned
            report.problems.append(
                f"{split}: {sum(counts[v] for v in bad)} labels outside 0..{allowed - 1} "
                f"(data.num_classes={report.num_classes}): values {bad[:10]}"
            )


def _ignore(splits):
    classes = getattr(splits.train, "classes", None)
    return getattr(classes, "ignore_index", None)


def _scan_samples(dataset, split, full, counts, report, skip) -> None:
    """(path, label) samples: each file readable, each label within the classes."""
    kept = []
    allowed = report.num_classes or len(report.class_names) or None
    for path, label in _progress(dataset.samples, f"checking {split} images"):
        problem = file_problem(path, full)[0]
        if problem:
            _bad_file(report, f"{path}: {problem}", skip)
            if skip:
                continue
        if allowed is not None and not 0 <= label < allowed:
            report.problems.append(
                f"{path}: label {label} outside 0..{allowed - 1} (data.num_classes={allowed})"
            )
        counts[label] += 1
        kept.append((path, label))
    dataset.samples[:] = kept


def _scan_pairs(dataset, split, full, counts, report, skip) -> None:
    """(image, mask) pairs: both files readable, the mask present and the image's size.
    The mask's values are placed in classes and counted per pixel with ``full``, and also
    by the fast check when they are classes (not binary): a value outside them would stop
    training mid-epoch, and a small mask decodes in about the time its header takes."""
    kept = []
    read_values = full or not dataset.classes.binary
    report.mask_values = report.mask_values or (read_values and not full)
    for image_path, mask_path in _progress(dataset.pairs, f"checking {split} images and masks"):
        problem = _pair_problem(image_path, mask_path, full)
        if not problem and read_values:
            try:
                mask = _open_image(mask_path)
                labels = dataset.classes.labels(mask, mask_path)
                if dataset.classes.binary and max(report.binary_values, default=0) < \
                        dataset.classes.threshold:
                    report.binary_values.update(np.unique(_mask_values(mask, mask_path, False))
                                                .tolist())
            except BadFile as err:
                problem = f"its mask {mask_path}: does not decode ({err.reason})"
            except TrainlabError as err:
                report.problems.append(str(err).removeprefix("data: "))
            else:
                values, numbers = np.unique(labels, return_counts=True)
                counts.update(dict(zip(values.tolist(), numbers.tolist(), strict=True)))
        if problem:
            _bad_file(report, f"{image_path}: {problem}", skip)
            if skip:
                continue
        kept.append((image_path, mask_path))
    dataset.pairs[:] = kept


def _pair_problem(image_path: Path, mask_path: Path, full: bool) -> str | None:
    """What is wrong with an image or its mask file, said once per pair."""
    problem, image_size = file_problem(image_path, full)
    if problem:
        return problem
    mask_problem, mask_size = file_problem(mask_path, full)
    if mask_problem == "missing":
        return f"has no mask {mask_path} (data.dataset.mask_name names it)"
    if mask_problem:
        return f"its mask {mask_path}: {mask_problem}"
    if mask_size != image_size:
        return (f"its mask {mask_path} is {mask_size[0]}x{mask_size[1]}, the image "
                f"{image_size[0]}x{image_size[1]}")
    return None


def _bad_file(report: DataReport, line: str, skip: bool) -> None:
    if skip:
        report.skipped.append(line)
    else:
        report.problems.append(line)
        report.bad_files += 1


def file_problem(path: Path, full: bool) -> tuple[str | None, tuple[int, int] | None]:
    """What is wrong with one image file (None if nothing), and its upright (w, h) size.

    The header is read and the file's last bytes checked; ``full`` also decodes it.
    """
    if not path.is_file():
        return "missing", None
    try:
        with Image.open(path) as image:
            size, kind = upright_size(image), image.format
    except UNREADABLE as err:
        return f"not a readable image ({err})", None
    endings = ENDINGS.get(kind)
    if endings:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 64))
            tail = handle.read().rstrip(b"\x00")
        if not any(tail.endswith(ending) for ending in endings):
            return f"truncated {kind} (the file ends early)", None
    if full:
        try:
            _open_image(path)
        except BadFile as err:
            return f"does not decode ({err.reason})", None
    return None, size


def _progress(items, what: str):
    """A progress bar on a terminal for long scans; plain iteration otherwise."""
    if len(items) < 2000 or not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=what, unit="file", leave=False)


def log_to_run(report: DataReport, tracker) -> None:
    """The report as ``data/check.txt``; skipped files as ``data/skipped_files.txt`` and
    their count as the param ``data.skipped_files``."""
    tracker.log_text(report.text() + "\n", "data/check.txt")
    if report.skipped:
        tracker.log_text("\n".join(report.skipped) + "\n", "data/skipped_files.txt")
    tracker.log_params({"data.skipped_files": len(report.skipped)})


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="data_check")
def main(cfg: DictConfig) -> None:
    choices = hydra.core.hydra_config.HydraConfig.get().runtime.choices
    try:
        data = prepare_data(cfg, choices)
    except TrainlabError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(data.report.text())


def cli(args: list[str]) -> int:
    """`trainlab data check data=... [augment=...] [data.check=full]`."""
    if not args or args[0] != "check":
        print("usage: trainlab data check data=NAME [augment=NAME] [data.check=fast|full]",
              file=sys.stderr)
        return 2
    return run_hydra_app(main, "data-check", args[1:])
