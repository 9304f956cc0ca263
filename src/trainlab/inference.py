"""Using a trained model: `trainlab eval` (metrics on a split) and `trainlab predict` (files).

A model is found by its MLflow run (``run_id=ID``: the run's ``config.yaml`` and
``checkpoints/best.pt`` artifacts) or by a checkpoint file (``ckpt=PATH``, its config next to
it in the Hydra output folder, or ``config=FILE``). Arguments are ``key=value``; dotted keys
(``data.batch_size=256``) override the training config.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from trainlab.app import take_config_dirs
from trainlab.errors import TrainlabError
from trainlab.store import SWEEP_ROLE_TAG, best_job_hint, existing_store, find_run

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SOURCE_TAG = "trainlab.source_run_id"


@dataclass
class Source:
    """A trained model's config and checkpoint, and the MLflow run they came from."""

    cfg: DictConfig
    checkpoint: Path
    run_id: str | None = None
    experiment_id: str | None = None


def parse_args(args: list[str], allowed: set[str]) -> tuple[dict[str, str], list[str]]:
    """``key=value`` options (``allowed`` keys), and config overrides: dotted values, or
    group choices (``experiment=NAME``, ``model=mlp``) that compose the config afresh."""
    from trainlab.app import config_groups

    options, overrides = {}, []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise TrainlabError(f"argument {arg!r} is not key=value; options: {sorted(allowed)}")
        if key in allowed:
            options[key] = value
        elif "." in key or key in config_groups():
            overrides.append(arg)
        else:
            raise TrainlabError(f"unknown option {key!r}; choose from {sorted(allowed)}, "
                                "override a config value (data.batch_size=256) or choose a "
                                "config (experiment=NAME)")
    return options, overrides


def find_source(options: dict[str, str], overrides: list[str], workdir: Path) -> Source:
    """The config and checkpoint of ``run_id=`` or ``ckpt=``, overrides applied, its values
    checked as training checks them. With a group choice among the overrides the config is
    composed from them, as `trainlab train` would (on the same search path), instead of read
    from the run."""
    from trainlab.config_check import ConfigError, schema_problems

    source = _found_source(options, overrides, workdir)
    # types and ranges only: an older run's config may lack keys added since
    problems = schema_problems(source.cfg)
    if problems:
        raise ConfigError(problems)
    return source


def _found_source(options: dict[str, str], overrides: list[str], workdir: Path) -> Source:
    from trainlab.app import compose, config_groups, make_user_code_importable

    make_user_code_importable()
    which = options.get("checkpoint", "best")
    groups = config_groups()
    if "ckpt" in options and not Path(options["ckpt"]).is_file():
        raise TrainlabError(f"ckpt={options['ckpt']}: no such file; pass a checkpoint "
                            "(outputs/runs/<run>/checkpoints/best.pt) or run_id=ID")
    if any(o.partition("=")[0] in groups for o in overrides):
        if "ckpt" not in options and "run_id" not in options:
            raise TrainlabError("say which model: run_id=MLFLOW_RUN_ID or ckpt=PATH")
        cfg = compose("train", overrides)
        if "run_id" in options:
            return replace(_from_run(options["run_id"], which, workdir,
                                     options.get("tracking_uri")), cfg=cfg)
        return Source(cfg, Path(options["ckpt"]).resolve())
    if "run_id" in options:
        source = _from_run(options["run_id"], which, workdir, options.get("tracking_uri"))
    elif "ckpt" in options:
        checkpoint = Path(options["ckpt"]).resolve()
        candidates = [Path(options["config"])] if "config" in options else [
            checkpoint.parent / "config.yaml", checkpoint.parent.parent / ".hydra" / "config.yaml",
        ]
        config = next((path for path in candidates if path.is_file()), None)
        if config is None:
            raise TrainlabError(f"no training config for {checkpoint} (looked for "
                                f"{', '.join(map(str, candidates))}); pass config=FILE")
        source = Source(OmegaConf.load(config), checkpoint)
    else:
        raise TrainlabError("say which model: run_id=MLFLOW_RUN_ID or ckpt=PATH")
    source.cfg.merge_with_dotlist(overrides)
    return source


def _from_run(run_id: str, which: str, workdir: Path, tracking_uri: str | None) -> Source:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = existing_store("tracking_uri=URI", tracking_uri)
    try:
        run = find_run(client, run_id)
    except TrainlabError as err:
        raise TrainlabError(f"run_id={run_id}: {err}") from None
    if run.data.tags.get(SWEEP_ROLE_TAG) == "sweep":
        raise TrainlabError(f"run_id={run_id}: {best_job_hint(run)}")
    run_id = run.info.run_id
    try:
        config = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="config.yaml", dst_path=str(workdir))
    except (MlflowException, OSError) as err:
        raise TrainlabError(
            f"run_id={run_id}: cannot get its config.yaml from "
            f"{mlflow.get_tracking_uri()} ({str(err).splitlines()[0]})"
        ) from err
    checkpoint = run_checkpoint(run, which, workdir)
    return Source(OmegaConf.load(config), checkpoint, run_id, run.info.experiment_id)


def run_checkpoint(run, which: str, workdir: Path) -> Path:
    """A run's ``<which>.pt``: in its checkpoint folder (tag ``trainlab.checkpoints``), where
    training keeps them; else the copy the run logged (``logger.log_checkpoints=true``);
    else, for ``best``, the weights of the run's logged model."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from trainlab.checkpoint import CHECKPOINTS_TAG

    folder = run.data.tags.get(CHECKPOINTS_TAG)
    if folder and (Path(folder) / f"{which}.pt").is_file():
        return Path(folder) / f"{which}.pt"
    run_id = run.info.run_id
    try:
        return Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"checkpoints/{which}.pt", dst_path=str(workdir)))
    except (MlflowException, OSError):
        pass
    if which == "best" and run.outputs and run.outputs.model_outputs:
        return _logged_model_weights(run_id, workdir)
    raise TrainlabError(
        f"run_id={run_id}: no checkpoints/{which}.pt in {folder or 'its output folder'} on "
        "this machine, and the run logged no copy; pass ckpt=PATH, or train with "
        "logger.log_checkpoints=true to keep a copy in MLflow"
    )


def _logged_model_weights(run_id: str, workdir: Path) -> Path:
    """The weights of the run's logged model (its best epoch) as a checkpoint file."""
    import mlflow.pytorch
    import torch

    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model", map_location="cpu")
    path = Path(workdir) / "best.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


def load_model(cfg: DictConfig, checkpoint: Path):
    """The trained architecture with the checkpoint's weights, all of them, in eval mode."""
    from trainlab.models.finetune import build_model, load_weights

    node = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    # Only what shapes the architecture counts; the file brings the weights.
    for key, value in {"pretrained": False, "weights_path": None, "freeze": None, "init": None,
                       "unfreeze_at_epoch": None, "compile": False}.items():
        if key in node:
            node[key] = value
    model, _ = build_model(node)
    load_weights(model, str(checkpoint), strict=True)
    return model.eval()


# --------------------------------------------------------------------------- eval
EVAL_OPTIONS = {"run_id", "ckpt", "config", "checkpoint", "split", "tracking_uri"}


def evaluate(options: dict[str, str], overrides: list[str]) -> dict[str, float]:
    """Metrics of a trained model on one split, logged to a new run linked to its source."""
    import mlflow

    from trainlab.components import build
    from trainlab.data.check import check_split, counted
    from trainlab.data.loaders import build_loaders
    from trainlab.distributed import select_device
    from trainlab.losses import build_loss
    from trainlab.metrics import TaskMetrics
    from trainlab.runner import loop_settings
    from trainlab.tracking import flatten

    split = options.get("split", "val")
    with tempfile.TemporaryDirectory(prefix="trainlab-eval-") as tmp:
        source = find_source(options, overrides, Path(tmp))
        cfg = source.cfg
        model = load_model(cfg, source.checkpoint)
        device = select_device(cfg.trainer.accelerator)
        splits = build(cfg.data.dataset, "data")
        if split not in splits.available():
            raise TrainlabError(f"split={split!r}; this data has {', '.join(splits.available())}"
                                " (image_folder: data.dataset.test_root, csv_images: "
                                "data.dataset.test_csv add a test split)")
        skipped = check_split(cfg, splits, split).skipped
        if skipped:
            print(f"skipped {counted(len(skipped), 'unreadable file')} of the {split} split "
                  f"(data.skip_bad_files=true): {'; '.join(skipped[:3])}"
                  + (" ..." if len(skipped) > 3 else ""))
        dataset = getattr(splits, split)
        # The validation loader's settings (no shuffle, no dropped batch) for any split.
        loader = build_loaders(replace(splits, val=dataset), cfg.data, int(cfg.seed), device)[1]
        runner = build(loop_settings(cfg.trainer), "trainer")(
            model=model, loss=build_loss(cfg.loss, None, cfg.data), optimizer=None,
            train_loader=None, val_loader=loader, tracker=None,
            checkpoint_dir=Path(tmp) / "checkpoints", precision=build(cfg.precision, "precision"),
            metrics=TaskMetrics.from_config(cfg),
            device=device,
        )
        metrics = {f"{split}/{key.split('/', 1)[1]}": value
                   for key, value in runner.validate().items()}
        tracker = build(cfg.logger, "logger")
        if "tracking_uri" in options:
            tracker.tracking_uri = options["tracking_uri"]
        origin = source.run_id[:8] if source.run_id else source.checkpoint.name
        tags = {
            "trainlab.command": " ".join(["trainlab", "eval", *sys.argv[2:]]),
            "trainlab.source_checkpoint": str(options.get("ckpt", source.checkpoint.name)),
        }
        if source.run_id:
            tags[SOURCE_TAG] = source.run_id
            tags["mlflow.note.content"] = (
                f"Evaluation of run [{source.run_id}]"
                f"(#/experiments/{source.experiment_id}/runs/{source.run_id}) on {split}."
            )
        with tracker.run(f"eval {split} {origin}", tags):
            tracker.log_params({**flatten(OmegaConf.to_container(cfg, resolve=True)),
                                "eval.split": split, "eval.skipped_files": len(skipped)})
            tracker.log_metrics(metrics, step=0)
            if source.run_id:
                mlflow.MlflowClient().set_tag(source.run_id, "trainlab.eval_run_id",
                                              tracker.run_id)
    for key, value in metrics.items():
        print(f"{key} = {value:.4f}")
    print(f"logged to MLflow run {tracker.run_id}")
    return metrics


def eval_cli(args: list[str]) -> int:
    """`trainlab eval run_id=ID|ckpt=PATH [split=val|train|test] [checkpoint=best|last] [a.b=v]`."""
    return _guarded(lambda given: evaluate(*parse_args(given, EVAL_OPTIONS)), eval_cli.__doc__,
                    args)


# ------------------------------------------------------------------------ predict
PREDICT_OPTIONS = {"run_id", "ckpt", "config", "checkpoint", "input", "output", "tracking_uri",
                   "tta", "top_k"}


def class_names(source: Source, workdir: Path, num_classes: int) -> list[str]:
    """The training data's class names (saved with the checkpoints), else the indices."""
    import json

    from trainlab.checkpoint import CLASS_NAMES

    path = source.checkpoint.parent / CLASS_NAMES
    if source.run_id and not path.is_file():
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            path = Path(mlflow.artifacts.download_artifacts(
                run_id=source.run_id, artifact_path=f"checkpoints/{CLASS_NAMES}",
                dst_path=str(workdir)))
        except (MlflowException, OSError):
            pass
    names = json.loads(path.read_text()) if path.is_file() else []
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def probabilities(model, batch: torch.Tensor, tta: bool) -> torch.Tensor:
    """Class probabilities (softmax; sigmoid for one channel); with ``tta`` the mean over the
    image and its mirror image (a mask's mirror flipped back)."""
    import torch

    def probs(images):
        logits = model(images).float()
        return torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(dim=1)

    result = probs(batch)
    if tta:
        mirrored = probs(batch.flip(-1))
        result = (result + (mirrored.flip(-1) if result.ndim == 4 else mirrored)) / 2
    return result


def predict(options: dict[str, str], overrides: list[str]) -> Path:
    """Predict every image of ``input`` in batches: a CSV of classes (file, class, its
    probability, the top k) or one PNG mask per image. Unreadable files are skipped and
    listed. Images go through the training data's own preprocessing."""
    import torch
    from tqdm.auto import tqdm

    from trainlab.data.check import counted
    from trainlab.data.images import IMAGE_SUFFIXES, BadFile, ImageFiles

    if "input" not in options:
        raise TrainlabError("say which images: input=FOLDER")
    folder = Path(options["input"])
    if not folder.is_dir():
        raise TrainlabError(f"input={folder} is not a folder")
    tta = _flag(options.get("tta", "false"), "tta")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrainlabError(f"input={folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    with tempfile.TemporaryDirectory(prefix="trainlab-predict-") as tmp:
        source = find_source(options, overrides, Path(tmp))
        cfg = source.cfg
        model = load_model(cfg, source.checkpoint)
        names = class_names(source, Path(tmp), int(cfg.data.num_classes))
    size = OmegaConf.to_object(cfg.data).get("image_size")
    size = (size, size) if isinstance(size, int) else size
    images = ImageFiles([(path, 0) for path in files], size, int(cfg.data.in_channels))
    top_k = None if cfg.data.task == "segmentation" else _top_k(options.get("top_k"), len(names))
    output = Path(options.get("output", Path("predictions") / (source.run_id or
                                                                source.checkpoint.stem)))
    output.mkdir(parents=True, exist_ok=True)
    writer = MaskWriter(output) if top_k is None else ClassWriter(
        output / "predictions.csv", names, top_k)
    batch_size = int(cfg.data.get("batch_size", 64))
    skipped: list[tuple[Path, str]] = []
    with writer, torch.inference_mode():
        for start in tqdm(range(0, len(files), batch_size), desc="predict", leave=False,
                          unit="batch"):
            batch, kept = [], []
            for index in range(start, min(start + batch_size, len(files))):
                try:
                    batch.append(images.load(index)[0])
                except BadFile as err:
                    skipped.append((files[index], err.reason))
                    continue
                kept.append(files[index])
            if kept:
                writer.write(kept, probabilities(model, torch.stack(batch), tta).cpu())
    print(f"wrote predictions for {counted(len(files) - len(skipped), 'image')} to {output}"
          + (" (flip TTA)" if tta else ""))
    if skipped:
        listing = output / "skipped.txt"
        listing.write_text("".join(f"{path}\t{reason}\n" for path, reason in skipped))
        print(f"skipped {counted(len(skipped), 'unreadable file')} (listed in {listing}): "
              + ", ".join(path.name for path, _ in skipped[:5])
              + (" ..." if len(skipped) > 5 else ""))
    return output


def _flag(value: str, key: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise TrainlabError(f"{key}={value!r}; choose true or false")
    return value.lower() == "true"


def _top_k(value: str | None, classes: int) -> int:
    """The ``top_k=`` asked for, or 5 (at most the model's classes)."""
    if value is None:
        return min(5, classes)
    if not value.isdigit() or not 1 <= int(value) <= classes:
        raise TrainlabError(f"top_k={value!r}; choose a whole number from 1 to {classes}")
    return int(value)


class ClassWriter:
    """predictions.csv: file, class (name), class_index, probability, and the top k as
    ``name:probability`` pairs, written batch by batch."""

    def __init__(self, path: Path, names: list[str], top_k: int) -> None:
        self.path, self.names, self.top_k = path, names, top_k

    def __enter__(self):
        import csv

        self.handle = self.path.open("w", newline="")
        self.csv = csv.writer(self.handle)
        self.csv.writerow(["file", "class", "class_index", "probability", f"top{self.top_k}"])
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def write(self, files: list[Path], probs: torch.Tensor) -> None:
        values, indices = probs.topk(self.top_k, dim=1)
        for file, top_p, top_i in zip(files, values.tolist(), indices.tolist(), strict=True):
            ranked = " ".join(f"{self.names[i]}:{p:.4f}" for i, p in zip(top_i, top_p, strict=True))
            self.csv.writerow([file.name, self.names[top_i[0]], top_i[0], f"{top_p[0]:.6f}",
                               ranked])


class MaskWriter:
    """One 8-bit PNG per image at its upright size: class indices, or 0/255 when binary."""

    def __init__(self, output: Path) -> None:
        self.output = output

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def write(self, files: list[Path], probs: torch.Tensor) -> None:
        import numpy as np
        import torch
        from PIL import Image

        from trainlab.data.images import upright_size

        if probs.shape[1] == 1:
            masks = (probs[:, 0] > 0.5).to(torch.uint8).mul(255)
        else:
            masks = probs.argmax(dim=1).to(torch.uint8)
        for file, mask in zip(files, masks.numpy().astype(np.uint8), strict=True):
            with Image.open(file) as original:
                size = upright_size(original)  # the image as decoded, turned by its EXIF
            Image.fromarray(mask).resize(size, Image.NEAREST).save(self.output / f"{file.stem}.png")


def predict_cli(args: list[str]) -> int:
    """`trainlab predict run_id=ID|ckpt=PATH input=FOLDER [output=DIR] [tta=true] [top_k=5]
    [a.b=value ...]`."""
    return _guarded(lambda given: predict(*parse_args(given, PREDICT_OPTIONS)),
                    predict_cli.__doc__, args)


def _guarded(action, usage: str, args: list[str]) -> int:
    """Usage on ``--help``; a user error as one line and exit code 1."""
    if any(arg in ("-h", "--help") for arg in args):
        print("usage: " + usage.strip("`."))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        action(take_config_dirs(args))  # --config-dir DIR, as every command takes it
    except TrainlabError as err:
        for line in str(err).splitlines():  # a config's problems: one line each
            print(f"error: {line}", file=sys.stderr)
        return 1
    return 0
