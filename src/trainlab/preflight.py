"""Steps 2 and 3 of a run, after the parts are built and before MLflow is touched: try one
batch through them, and fit a ``trainer.resume`` checkpoint into them.

A misfit between model, data and loss then shows as one line naming both sides, and a
checkpoint that does not fit is refused, while no run exists yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from trainlab.checkpoint import rng_state, set_rng_state
from trainlab.errors import TrainlabError

DRY_RUN_SAMPLES = 4


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _shape(tensor: torch.Tensor) -> str:
    return "×".join(map(str, tensor.shape))


def try_one_batch(runner: Any, data: DictConfig, choices: dict) -> None:
    """Forward a few validation samples through the model, the loss and the metrics.

    In eval mode, without gradients and without an optimizer step: weights, BatchNorm
    statistics and every random stream stay as they were, so seeded runs and resumed runs
    are unchanged by it.
    """
    model_name = f"model={choices.get('model') or 'model'}"
    data_name = (
        f"data={choices.get('data') or 'data'} (in_channels={data.in_channels}, "
        f"image_size={list(data.image_size)}, num_classes={data.num_classes})"
    )
    try:
        inputs, targets = next(iter(runner.val_loader))
    except StopIteration:
        raise TrainlabError(f"{data_name} has an empty validation split") from None
    inputs = inputs[:DRY_RUN_SAMPLES].to(runner.device)
    targets = targets[:DRY_RUN_SAMPLES].to(runner.device)
    model, was_training, rng = runner.model, runner.model.training, rng_state()
    try:
        model.eval()
        with torch.no_grad(), runner.precision.autocast():
            try:
                logits = model(inputs)
            except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as err:
                raise TrainlabError(
                    f"{model_name} cannot take a batch of {data_name}, shaped "
                    f"{_shape(inputs)}: {_first_line(err)}"
                ) from err
            _check_outputs(logits, targets, data, model_name)
            try:
                loss = runner.loss(logits, targets)
                totals = runner.metrics.val(runner.device)
                totals.update(loss, logits, targets)
                totals.compute()
            except (RuntimeError, ValueError, IndexError, TypeError) as err:
                raise TrainlabError(
                    f"loss={choices.get('loss') or 'loss'} cannot score {model_name}'s output "
                    f"{_shape(logits)} against {data_name} targets {_shape(targets)}: "
                    f"{_first_line(err)}"
                ) from err
    finally:
        model.train(was_training)
        set_rng_state(rng)


def _check_outputs(logits: torch.Tensor, targets: torch.Tensor, data: DictConfig,
                   model_name: str) -> None:
    """Outputs a loss would silently accept but that do not fit the data (class count, mask
    size)."""
    if logits.dim() < 2:
        return
    expected = int(data.num_classes)
    if logits.shape[1] != expected:
        raise TrainlabError(
            f"{model_name} gives {logits.shape[1]} outputs per sample but data.num_classes="
            f"{expected}; the model's num_classes must match the data's"
        )
    if data.task == "segmentation" and logits.shape[-2:] != targets.shape[-2:]:
        raise TrainlabError(
            f"{model_name} gives {_shape(logits)} masks but the data's masks are "
            f"{_shape(targets)}; the model must keep the image size (data.image_size="
            f"{list(data.image_size)})"
        )


def resume_into(runner: Any, checkpoint: Path) -> str | None:
    """Load a ``trainer.resume`` checkpoint into the built parts (weights, optimizer,
    scheduler, counters, random streams) and return the MLflow run it was tracked in, to
    reopen. A checkpoint that does not fit the parts is refused before that run is touched.
    """
    state = runner.load_state(checkpoint)
    return state.get("mlflow_run_id")
