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

from trainlab.errors import TrainlabError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
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
    """The config and checkpoint of ``run_id=`` or ``ckpt=``, overrides applied. With a
    group choice among the overrides the config is composed from them, as `trainlab train`
    would (on the same search path), instead of read from the run."""
    from trainlab.app import compose, config_groups, make_user_code_importable

    make_user_code_importable()
    which = options.get("checkpoint", "best")
    groups = config_groups()
    if any(o.partition("=")[0] in groups for o in overrides):
        if "ckpt" not in options and "run_id" not in options:
            raise TrainlabError("say which model: run_id=MLFLOW_RUN_ID or ckpt=PATH")
        cfg = compose("train", overrides)
        if "run_id" in options:
            return replace(_from_run(options["run_id"], which, workdir), cfg=cfg)
        return Source(cfg, Path(options["ckpt"]).resolve())
    if "run_id" in options:
        source = _from_run(options["run_id"], which, workdir)
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


def _from_run(run_id: str, which: str, workdir: Path) -> Source:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient().get_run(run_id)
        config = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="config.yaml", dst_path=str(workdir))
        checkpoint = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"checkpoints/{which}.pt", dst_path=str(workdir))
    except (MlflowException, OSError) as err:
        raise TrainlabError(
            f"run_id={run_id}: cannot get its config.yaml and checkpoints/{which}.pt from "
            f"{mlflow.get_tracking_uri()} ({str(err).splitlines()[0]})"
        ) from err
    return Source(OmegaConf.load(config), Path(checkpoint), run_id, run.info.experiment_id)


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
    from trainlab.data.loaders import build_loaders
    from trainlab.distributed import select_device
    from trainlab.tracking import flatten

    if "tracking_uri" in options:
        mlflow.set_tracking_uri(options["tracking_uri"])
    split = options.get("split", "val")
    with tempfile.TemporaryDirectory(prefix="trainlab-eval-") as tmp:
        source = find_source(options, overrides, Path(tmp))
        cfg = source.cfg
        model = load_model(cfg, source.checkpoint)
        device = select_device(cfg.trainer.accelerator)
        splits = build(cfg.data.dataset, "data")
        dataset = getattr(splits, split, None)
        if dataset is None:
            raise TrainlabError(f"split={split!r}; this data has train and val")
        # The validation loader's settings (no shuffle, no dropped batch) for any split.
        loader = build_loaders(replace(splits, val=dataset), cfg.data, int(cfg.seed), device)[1]
        runner = build(cfg.trainer, "trainer")(
            model=model, loss=build(cfg.loss, "loss"), optimizer=None, train_loader=None,
            val_loader=loader, tracker=None, checkpoint_dir=Path(tmp) / "checkpoints",
            precision=build(cfg.precision, "precision"), device=device,
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
                                "eval.split": split})
            tracker.log_metrics(metrics, step=0)
            if source.run_id:
                mlflow.MlflowClient().set_tag(source.run_id, "trainlab.eval_run_id",
                                              tracker.run_id)
    for key, value in metrics.items():
        print(f"{key} = {value:.4f}")
    print(f"logged to MLflow run {tracker.run_id}")
    return metrics


def eval_cli(args: list[str]) -> int:
    """`trainlab eval run_id=ID|ckpt=PATH [split=val] [checkpoint=best|last] [a.b=value ...]`."""
    return _guarded(lambda: evaluate(*parse_args(args, EVAL_OPTIONS)), eval_cli.__doc__, args)


# ------------------------------------------------------------------------ predict
PREDICT_OPTIONS = {"run_id", "ckpt", "config", "checkpoint", "input", "output", "tracking_uri"}


def load_images(folder: Path, channels: int, size) -> tuple[list[Path], list, torch.Tensor]:
    """Images of ``folder`` as a float batch in [0, 1], resized as in training."""
    import numpy as np
    import torch
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrainlabError(f"input={folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    mode = "L" if channels == 1 else "RGB"
    arrays, sizes = [], []
    for path in files:
        image = Image.open(path).convert(mode)
        sizes.append(image.size)
        if size is not None:
            height, width = (size, size) if isinstance(size, int) else size
            image = image.resize((width, height), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    return files, sizes, torch.from_numpy(np.stack(arrays))


def predict(options: dict[str, str], overrides: list[str]) -> Path:
    """Write a CSV (file, class, probability) or one PNG mask per image; returns the folder."""
    import mlflow
    import torch

    if "tracking_uri" in options:
        mlflow.set_tracking_uri(options["tracking_uri"])
    if "input" not in options:
        raise TrainlabError("say which images: input=FOLDER")
    folder = Path(options["input"])
    if not folder.is_dir():
        raise TrainlabError(f"input={folder} is not a folder")
    with tempfile.TemporaryDirectory(prefix="trainlab-predict-") as tmp:
        source = find_source(options, overrides, Path(tmp))
        cfg = source.cfg
        model = load_model(cfg, source.checkpoint)
    files, sizes, batch = load_images(folder, int(cfg.data.in_channels),
                                      OmegaConf.to_object(cfg.data).get("image_size"))
    name = source.run_id or source.checkpoint.stem
    output = Path(options.get("output", Path("predictions") / name))
    output.mkdir(parents=True, exist_ok=True)
    batch_size = int(cfg.data.get("batch_size", 64))
    with torch.inference_mode():
        logits = torch.cat([model(batch[i:i + batch_size])
                            for i in range(0, len(batch), batch_size)])
    if logits.ndim == 4:
        _write_masks(logits, files, sizes, output)
    elif logits.ndim == 2:
        _write_classes(logits, files, output / "predictions.csv")
    else:
        raise TrainlabError(f"cannot write predictions of shape {tuple(logits.shape)}; "
                            "expected (N, classes) or (N, classes, H, W)")
    print(f"wrote predictions for {len(files)} images to {output}")
    return output


def _write_classes(logits, files: list[Path], path: Path) -> None:
    import csv

    probabilities = logits.float().softmax(dim=1)
    best, classes = probabilities.max(dim=1)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "class", "probability"])
        for file, cls, prob in zip(files, classes.tolist(), best.tolist(), strict=True):
            writer.writerow([file.name, cls, f"{prob:.6f}"])


def _write_masks(logits, files: list[Path], sizes: list, output: Path) -> None:
    """One 8-bit PNG per image at its original size: class indices, or 0/255 when binary."""
    import numpy as np
    from PIL import Image

    if logits.shape[1] == 1:
        masks = (logits[:, 0] > 0).to(dtype=logits.dtype).mul(255)
    else:
        masks = logits.argmax(dim=1)
    for file, size, mask in zip(files, sizes, masks.cpu().numpy().astype(np.uint8), strict=True):
        Image.fromarray(mask).resize(size, Image.NEAREST).save(output / f"{file.stem}.png")


def predict_cli(args: list[str]) -> int:
    """`trainlab predict run_id=ID|ckpt=PATH input=FOLDER [output=DIR] [a.b=value ...]`."""
    return _guarded(lambda: predict(*parse_args(args, PREDICT_OPTIONS)), predict_cli.__doc__,
                    args)


def _guarded(action, usage: str, args: list[str]) -> int:
    """Usage on ``--help``; a user error as one line and exit code 1."""
    if any(arg in ("-h", "--help") for arg in args):
        print("usage: " + usage.strip("`."))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        action()
    except TrainlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
