"""Checkpoints on disk: written atomically, read back without executing pickled code."""

from __future__ import annotations

import math
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import torch

from trainlab.distributed import is_main_process
from trainlab.errors import TrainlabError

CLASS_NAMES = "class_names.json"  # beside the checkpoints: what predictions are called
INPUT_EXAMPLE = "input_example.npy"  # beside best.pt while a sweep decides whether to log it
CHECKPOINTS_TAG = "trainlab.checkpoints"  # a run's tag: the folder holding its checkpoints
MODEL_EPOCH_TAG = "trainlab.model_epoch"  # a run's tag: the epoch of its logged model


def save_class_names(names: list[str], folder: str | os.PathLike) -> Path:
    """The training data's class names, for `trainlab predict` and the metrics tables."""
    import json

    path = Path(folder) / CLASS_NAMES
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([str(name) for name in names]))
    return path


def save_input_example(example: Any, folder: str | os.PathLike) -> Path:
    """A batch of two inputs, kept so the model can be logged later with its signature."""
    import numpy as np

    path = Path(folder) / INPUT_EXAMPLE
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, example)
    return path


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` via a temp file and rename: a crash never leaves half a file. The
    file's mode follows the umask (0644 under 022), so teammates and an MLflow server running
    as another user can read it (``mkstemp`` would make it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; a missing, truncated or foreign file is a
    ``TrainlabError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TrainlabError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe files
        raise TrainlabError(f"{path} is not a readable checkpoint: {err}") from err
    if not isinstance(state, dict):
        raise TrainlabError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


class Checkpoints:
    """``last.pt`` and ``best.pt`` of one run: which epoch is best by the monitored metric,
    the ``top_k`` best epochs' own files (``epoch_003-val_acc_0.9722.pt``, epochs counted
    from 1; no ``=`` in the name, so the path works as a Hydra override's value), when a
    mid-epoch ``last.pt`` is due (every ``every_n_steps`` steps and/or ``every_n_minutes``,
    so a hard kill loses at most that much), and their atomic writes (by rank 0 only, in a
    DDP group)."""

    def __init__(self, folder: str | os.PathLike, monitor: str, mode: str,
                 every_n_steps: int | None = None, every_n_minutes: float | None = None,
                 top_k: int | None = None) -> None:
        if mode not in ("min", "max"):
            raise TrainlabError(f"trainer.monitor_mode={mode!r}; choose 'min' or 'max'")
        if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
            raise TrainlabError(f"trainer.save_top_k={top_k}; must be an integer >= 1, or null "
                                "(last.pt and best.pt only)")
        for key, value in (("checkpoint_every_n_steps", every_n_steps),
                           ("checkpoint_every_n_minutes", every_n_minutes)):
            if value is not None and not float(value) > 0:
                raise TrainlabError(f"trainer.{key}={value}; must be > 0, or null (epoch "
                                    "ends only)")
        self.folder, self.monitor, self.mode = Path(folder), monitor, mode
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch = -1
        self.top_k = int(top_k or 0)
        self.ranked: list[tuple[float, int, str]] = []  # (value, epoch, file name), best first
        self._strays: list[str] = []  # epoch files no checkpoint lists: a cut-short attempt's
        self.every_n_steps = int(every_n_steps or 0)
        self.every_s = float(every_n_minutes or 0) * 60
        self._saved_at = time.monotonic()

    def periodic_due(self, global_step: int) -> bool:
        """True when a mid-epoch ``last.pt`` is due at ``global_step``."""
        if self.every_n_steps and global_step % self.every_n_steps == 0:
            return True
        return bool(self.every_s) and time.monotonic() - self._saved_at >= self.every_s

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    def improves(self, value: float) -> bool:
        return value < self.best if self.mode == "min" else value > self.best

    def note(self, value: float, epoch: int) -> bool:
        """Take an epoch's monitored value; True when it is the new best."""
        improved = self.improves(value)
        if improved:
            self.best, self.best_epoch = value, epoch
        return improved

    def save(self, state: dict[str, Any], improved: bool = False) -> None:
        """Write ``last.pt`` (and ``best.pt`` when ``improved``) with the best so far; at an
        epoch end also the epoch's own file when it ranks among the ``top_k``. The file it
        pushes out is deleted only once ``last.pt`` lists the new ranking, so a kill at any
        point leaves every file the resumed run will rank."""
        self._saved_at = time.monotonic()
        epoch_end = state.get("batches_done") is None
        own, dropped = self._rank(state) if epoch_end else (None, [])
        if not is_main_process():
            return
        state = {**state, "monitor": self.monitor, "best": self.best,
                 "best_epoch": self.best_epoch, "ranked": [list(e) for e in self.ranked]}
        if own is not None:
            save_checkpoint(state, self.folder / own)
        save_checkpoint(state, self.last)
        if improved:
            save_checkpoint(state, self.folder / "best.pt")
        kept = {name for _, _, name in self.ranked}
        for name in {*dropped, *self._strays} - kept:
            (self.folder / name).unlink(missing_ok=True)
        self._strays = []

    def _rank(self, state: dict[str, Any]) -> tuple[str | None, list[str]]:
        """Put an epoch-end ``state`` into the top-k ranking: its file name if it made it,
        and the names that fell out."""
        value = (state.get("metrics") or {}).get(self.monitor)
        if not self.top_k or value is None or math.isnan(value):
            return None, []
        epoch = int(state["epoch"])
        own = f"epoch_{epoch + 1:03d}-{self.monitor.replace('/', '_')}_{value:.4f}.pt"
        ranked = sorted([*self.ranked, (float(value), epoch, own)],  # stable: ties keep the
                        key=lambda entry: entry[0], reverse=self.mode == "max")  # older one
        self.ranked = ranked[: self.top_k]
        dropped = [name for _, _, name in ranked[self.top_k:]]
        return (None if own in dropped else own), [n for n in dropped if n != own]

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the best and the top-k ranking of a checkpoint's run (those of its files
        this folder holds: a branched run elsewhere starts a ranking of its own). Epoch files
        the checkpoint does not list (written after it by an attempt a kill cut short) go at
        the next save."""
        self.best, self.best_epoch = float(state["best"]), int(state.get("best_epoch", -1))
        self.ranked = [(float(value), int(epoch), str(name))
                       for value, epoch, name in state.get("ranked") or []
                       if (self.folder / str(name)).is_file()]
        if self.top_k:  # without save_top_k now, the files a run kept earlier stay
            self._strays = [path.name for path in ranked_files(self.folder)]


def ranked_files(folder: str | os.PathLike) -> list[Path]:
    """The top-k epoch files in a checkpoint folder."""
    return sorted(Path(folder).glob("epoch_[0-9][0-9][0-9]*-*.pt"))


def tracked_files(folder: str | os.PathLike) -> list[Path]:
    """What of a checkpoint folder a run logs to MLflow: ``best.pt``, ``last.pt`` and the
    class names. The top-k epoch files stay on disk only: k copies of the weights per run
    would multiply the store's size, and ``best.pt`` is the best of them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ranked = set(ranked_files(folder))
    return [path for path in sorted(folder.iterdir())
            if path.is_file() and not path.name.startswith(".") and path not in ranked]


class KeptRows:
    """Sends metric rows to a tracker and keeps those the store has not confirmed: every
    checkpoint holds them, so a resume re-sends what a hard kill lost on the way to MLflow
    (the tracker drops the steps its run already has). A slow store keeps more of them."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self.rows: list[tuple[int, int, dict[str, float]]] = []  # (tracker call, step, values)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.log_metric_series([(step, metrics)])

    def log_metric_series(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        self.tracker.log_metric_series(rows)
        call = self.tracker.metric_calls
        self.rows += [(call, int(step), {k: float(v) for k, v in values.items()})
                      for step, values in rows]

    def unconfirmed(self) -> list[list]:
        """The rows not yet in the store, as plain lists for a ``weights_only`` file."""
        stored = self.tracker.metric_calls_stored()
        self.rows = [row for row in self.rows if row[0] > stored]
        return [[step, values] for _, step, values in self.rows]


def resolve_resume(value: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``trainer.resume``: null (fresh run), a checkpoint path, or ``last``: this run's own
    ``checkpoints/last.pt`` (``hydra.run.dir`` pointed at an interrupted run), else the newest
    one among the sibling run folders of ``output_dir``."""
    if value in (None, "", "null"):
        return None
    if value != "last":
        path = Path(value).expanduser()
        if not path.is_file():
            short_id = re.fullmatch(r"[0-9a-f]{1,7}", value) is not None
            raise TrainlabError(f"trainer.resume={value}: no such checkpoint file" + (
                "; a run id (or its prefix) needs 8 or more characters" if short_id else ""))
        return path
    output_dir = Path(output_dir).resolve()
    own = output_dir / "checkpoints" / "last.pt"
    if own.is_file():
        return own
    found = [
        p for p in output_dir.parent.glob("*/checkpoints/last.pt")
        if p.parent.parent.resolve() != output_dir
    ]
    if not found:
        raise TrainlabError(
            f"trainer.resume=last but no run under {output_dir.parent} has checkpoints/last.pt; "
            "give a checkpoint path instead"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def rng_state() -> dict[str, Any]:
    """The state of every random generator a run draws from, as plain tensors and lists (so
    ``weights_only`` loading reads it back)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
