"""What a run needs to be repeated months later: the software and hardware it ran on, the
state of the code (commit, uncommitted changes) and the data it read.

Recorded on every training run (``trainlab.train``) and read back by `trainlab reproduce`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGES_ARTIFACT = "environment/requirements.txt"
DIFF_ARTIFACT = "git/uncommitted.diff"
COMMIT_TAG = "mlflow.source.git.commit"
DIRTY_TAG = "trainlab.git.dirty"
MAX_UNTRACKED_BYTES = 1_000_000  # larger new files are named in the diff, not copied into it


# ----------------------------------------------------------------- environment
def installed_packages() -> dict[str, str]:
    """``{name: version}`` of every distribution importable in this interpreter."""
    return dict(_distributions())


@functools.lru_cache(maxsize=1)
def _distributions() -> tuple[tuple[str, str], ...]:
    """Read once per process (a quarter of a second): a sweep's jobs share the interpreter."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(name.lower().replace("_", "-"), dist.version)
    return tuple(sorted(found.items()))


def requirements_text(packages: Mapping[str, str]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in packages.items())


def parse_requirements(text: str) -> dict[str, str]:
    """The inverse of ``requirements_text``."""
    pairs = (line.split("==", 1) for line in text.splitlines() if "==" in line)
    return {name.strip(): version.strip() for name, version in pairs}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_tags() -> dict[str, str]:
    """Versions and hardware as ``trainlab.env.*`` tags (the run table can show them)."""
    import torch

    import trainlab

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "trainlab.env.python": platform.python_version(),
        "trainlab.env.trainlab": trainlab.__version__,
        "trainlab.env.torch": torch.__version__,
        "trainlab.env.cuda": torch.version.cuda or "none",
        "trainlab.env.cudnn": str(cudnn) if cudnn else "none",
        "trainlab.env.platform": platform.platform(),
        "trainlab.env.cpu": f"{cpu_model()} ({os.cpu_count()} logical)",
        "trainlab.env.gpu": ", ".join(gpus) if gpus else "none",
    }


# ----------------------------------------------------------------------- git
@dataclass
class GitState:
    commit: str
    dirty: bool
    diff: str  # tracked changes against HEAD, then new files not ignored


def _git(cwd: str | Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(cwd: str | Path = ".") -> GitState | None:
    """The commit checked out at ``cwd`` and its uncommitted changes (None outside git)."""
    commit = _git(cwd, "rev-parse", "HEAD")
    if commit is None:
        return None
    diff = _git(cwd, "diff", "HEAD", "--binary") or ""
    untracked = (_git(cwd, "ls-files", "--others", "--exclude-standard", "-z") or "").split("\0")
    for name in filter(None, untracked):
        path = Path(cwd) / name
        if path.is_file() and path.stat().st_size <= MAX_UNTRACKED_BYTES:
            # `git diff --no-index` exits 1 when files differ, so read its output directly
            proc = subprocess.run(["git", "diff", "--no-index", "--binary", "/dev/null", name],
                                  cwd=cwd, capture_output=True, text=True)
            diff += proc.stdout
        else:
            diff += f"# new file not included (larger than {MAX_UNTRACKED_BYTES} bytes): {name}\n"
    return GitState(commit=commit.strip(), dirty=bool(diff), diff=diff)


def git_tags(state: GitState | None) -> dict[str, str]:
    if state is None:
        return {}
    return {COMMIT_TAG: state.commit, DIRTY_TAG: str(state.dirty).lower()}


# ---------------------------------------------------------------------- data
def fingerprint(dataset: Any) -> str:
    """A digest of what a dataset holds: its tensors' bytes for in-memory data, its files'
    names, sizes and times for file datasets, else its class and length."""
    digest = hashlib.sha1(usedforsecurity=False)  # a fingerprint, fast on big tensors
    tensors = getattr(dataset, "tensors", None)
    files = getattr(dataset, "samples", None) or getattr(dataset, "pairs", None)
    if tensors is not None:
        for tensor in tensors:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    elif files is not None:
        for item in files:
            for part in item if isinstance(item, tuple) else (item,):
                digest.update(str(part).encode())
                if isinstance(part, Path) and part.is_file():
                    stat = part.stat()
                    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        digest.update(f"{type(dataset).__qualname__}:{len(dataset)}".encode())
    return digest.hexdigest()[:12]


def data_source(dataset_cfg: Mapping[str, Any]) -> tuple[str, str | None]:
    """Where a data config reads from: the first existing file or folder it names (as a
    local path), else the function that makes the data (``_target_``)."""
    for key, value in dataset_cfg.items():
        if key != "_target_" and isinstance(value, str) and value and Path(value).exists():
            return "local", str(Path(value).resolve())
    return "code", str(dataset_cfg.get("_target_"))


def dataset_inputs(splits: Any, data_cfg: Mapping[str, Any], name: str) -> list[dict]:
    """One MLflow dataset input per split (``train``, ``val``): name, source, digest and a
    profile with its size, so the run table's Dataset column says what the run read.
    Plain dicts (the fields of ``mlflow.entities.Dataset``), to be queued and sent later."""
    kind, where = data_source(data_cfg.get("dataset", {}))
    source = {"uri": where} if kind == "local" else {"tags": {"target": where}}
    inputs = []
    for split in ("train", "val"):
        dataset = getattr(splits, split)
        profile = {"num_rows": len(dataset), "task": data_cfg.get("task"),
                   "num_classes": data_cfg.get("num_classes")}
        inputs.append({"context": split, "dataset": {
            "name": name, "digest": fingerprint(dataset), "source_type": kind,
            "source": json.dumps(source), "profile": json.dumps(profile)}})
    return inputs


def record(tracker: Any, cwd: str | Path) -> None:
    """Log the environment and the git state of ``cwd`` to ``tracker``'s run."""
    state = git_state(cwd)
    tracker.set_tags({**environment_tags(), **git_tags(state)})
    tracker.log_text(requirements_text(installed_packages()), PACKAGES_ARTIFACT)
    if state is not None and state.dirty:
        tracker.log_text(state.diff, DIFF_ARTIFACT)
