"""The `trainlab` command: dispatches to the Hydra apps and tools without importing torch."""

from __future__ import annotations

import importlib
import os
import sys

# name → (module, function, one-line help). Each function takes the remaining arguments.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("trainlab.train", "cli", "train a model: trainlab train [-m] [group=option ...]"),
    "lr-plot": ("trainlab.lr_plot", "cli", "PNG of the lr curve: trainlab lr-plot scheduler=X"),
    "preview": ("trainlab.data.preview", "cli", "augmented-images grid: preview data=X augment=Y"),
    "data": ("trainlab.data.check", "cli", "scan files, masks, labels: trainlab data check data=X"),
    "models": ("trainlab.models.zoo", "models_cli", "list timm/torchvision architectures: "
               "trainlab models '*resnet*'"),
    "eval": ("trainlab.inference", "eval_cli", "metrics of a trained model: "
             "trainlab eval run_id=ID|ckpt=PATH [split=val|train|test]"),
    "predict": ("trainlab.inference", "predict_cli", "predict a folder of images: "
                "trainlab predict run_id=ID input=FOLDER"),
    "init": ("trainlab.starter", "init_cli", "a starter project (own data, model, losses, "
             "experiment): trainlab init DIR"),
    "reproduce": ("trainlab.reproduce", "reproduce_cli", "code, packages, config and command "
                  "that repeat a run: trainlab reproduce RUN_ID [--run]"),
    "runs": ("trainlab.compare", "runs_cli", "compare runs: trainlab runs [--sweep ID] [--plot F]"),
    "ui": ("trainlab.ui", "ui_cli", "serve the MLflow UI and print the run table's URL"),
    "sync": ("trainlab.sync", "sync_cli", "send what a run spooled while MLflow was down: "
             "trainlab sync OUTPUT_DIR"),
}

USAGE = """\
usage: trainlab COMMAND [overrides...]

commands:
{commands}

examples:
  trainlab train model=mlp optimizer.lr=1e-2
  trainlab train -m optimizer.lr=1e-3,1e-2        (a sweep: one MLflow run per job)
  trainlab train --help                            (config groups and their options)

Runs are tracked in MLflow (sqlite:///mlflow.db here by default): `mlflow ui` shows them.
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items())
        print(USAGE.format(commands=lines), end="")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"trainlab: unknown command {command!r}; choose one of {sorted(COMMANDS)}",
              file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[command]
    # MLflow's per-file download bar counts files, not bytes: "1/1" for a config is noise
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return getattr(importlib.import_module(module), function)(rest) or 0
    except KeyboardInterrupt:
        print("trainlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
