"""`trainlab lr-plot`: draw the lr curve a config's scheduler gives, without training.

Composes the same config as `trainlab train` (so `scheduler=onecycle trainer.max_epochs=10`
and `optimizer.head_lr=...` mean the same), builds the data loader (for its length), the
model and the optimizer, and steps the scheduler exactly as the runner does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from trainlab.app import CONFIG_DIR, run_hydra_app
from trainlab.errors import TrainlabError


def plot(cfg: DictConfig, out: Path) -> Path:
    from trainlab.config_check import check_config
    from trainlab.data.check import prepare_data
    from trainlab.data.loaders import build_loaders
    from trainlab.models.finetune import build_model
    from trainlab.optim import build_optimizer
    from trainlab.schedulers import build_scheduler, optimizer_steps, plot_lr, simulate

    choices = HydraConfig.get().runtime.choices
    check_config(cfg, choices, hardware=False)  # a curve needs no GPU, only sound values
    epochs = int(cfg.trainer.max_epochs)
    splits = prepare_data(cfg, choices).splits  # the classes the model needs, bad files out
    train_loader, _ = build_loaders(splits, cfg.data, int(cfg.seed), "cpu")
    model, unfreezing = build_model(cfg.model, choices.get("model"))
    optimizer = build_optimizer(cfg.optimizer, model, choices.get("optimizer"))
    steps, accumulate = len(train_loader), int(cfg.trainer.accumulate_grad_batches)
    scheduled = build_scheduler(cfg.scheduler, optimizer, choices.get("scheduler"),
                                optimizer_steps(steps, accumulate), epochs)
    lrs = simulate(scheduled, optimizer, steps, epochs, accumulate=accumulate,
                   callbacks=unfreezing)
    title = f"scheduler={choices.get('scheduler')}, {epochs} epochs × {steps} batches"
    if scheduled is not None and scheduled.needs_metric:
        title += " (monitored metric never improving)"
    if accumulate > 1:
        title += f", optimizer step every {accumulate}"
    return plot_lr(range(len(lrs)), lrs, out, title, steps_per_epoch=steps)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="lr_plot")
def main(cfg: DictConfig) -> None:
    out = Path(cfg.get("out") or f"lr_{HydraConfig.get().runtime.choices.get('scheduler')}.png")
    try:
        path = plot(cfg, out)
    except TrainlabError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {path}")


def cli(args: list[str]) -> int:
    """`trainlab lr-plot [overrides] [+out=FILE.png]`."""
    return run_hydra_app(main, "lr-plot", args)
