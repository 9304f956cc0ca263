"""The Hydra app plumbing every config-driven command shares: where the configs live and how
a ``@hydra.main`` function is called with a command's arguments.

Kept free of torch and mlflow so `trainlab COMMAND --help` answers at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONFIG_DIR = os.environ.get(
    "TRAINLAB_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf")
)


def run_hydra_app(app, name: str, args: list[str]) -> int:
    """Call a ``@hydra.main`` function with ``args`` as its command line."""
    sys.argv = [f"trainlab-{name}", *args]
    app()
    return 0
