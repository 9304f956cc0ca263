"""The `trainlab` command: dispatches to the Hydra apps and tools without importing torch."""

from __future__ import annotations

import sys

USAGE = """\
usage: trainlab COMMAND [overrides...]

commands:
  train    train a model: trainlab train [-m] [group=option ...] [key=value ...]
           e.g. trainlab train model=mlp optimizer.lr=1e-2
                trainlab train -m optimizer.lr=1e-3,1e-2      (a sweep)
                trainlab train --help                          (config groups and options)

Runs are tracked in MLflow (sqlite:///mlflow.db here by default): `mlflow ui` shows them.
"""


def _train(args: list[str]) -> int:
    from trainlab.train import main as train_main

    sys.argv = ["trainlab-train", *args]
    train_main()
    return 0


COMMANDS = {"train": _train}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"trainlab: unknown command {command!r}; choose one of {sorted(COMMANDS)}",
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest)
    except KeyboardInterrupt:
        print("trainlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
