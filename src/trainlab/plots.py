"""PNG figures: one headless matplotlib backend and one way to save, for every plot we draw."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 100, tight: bool = True) -> Path:
    """Lay out ``fig`` (``tight``: measured, a few tenths of a second for many axes), write it
    to ``path`` (folders made as needed) and free it."""
    if tight:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
