"""`trainer.resume`: which checkpoint, which MLflow run and which output dir a resumed run
continues, all decided and checked before the old run is touched."""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from trainlab.checkpoint import CHECKPOINTS_TAG, load_checkpoint, resolve_resume
from trainlab.config_check import RESUME_KEYS, override_key
from trainlab.errors import TrainlabError
from trainlab.liveness import judge
from trainlab.runner import EarlyStopping

log = logging.getLogger(__name__)

RESUME_AS = ("same_run", "new_run")
RUN_ID = re.compile(r"[0-9a-f]{8,32}")  # an MLflow run id, or the prefix `trainlab runs` shows


@dataclass
class ResumePlan:
    checkpoint: Path
    run_id: str | None  # the run to continue; None: a new run (``resume_as=new_run``)
    output_dir: Path  # where the fit writes checkpoints: the original run's folder
    tags: dict[str, str] = field(default_factory=dict)
    started_with: list[str] = field(default_factory=list)  # the reopened run's overrides


def plan_resume(trainer: Any, output_dir: Path, tracker: Any) -> ResumePlan | None:
    """Check ``trainer.resume`` against ``trainer.max_epochs`` and the run's logged history.

    A checkpoint behind what its run has logged (an older one, re-run by a requeue script)
    would log different values at steps the run already has: refused, naming the newer
    checkpoint, unless ``trainer.resume_as=new_run`` branches off into a new run. A run
    stopped after its last epoch (a signal while its model was logged) trains nothing more:
    the resume logs what it missed and finishes it.
    """
    resume_as = trainer.get("resume_as") or "same_run"
    if resume_as not in RESUME_AS:
        raise TrainlabError(f"trainer.resume_as={resume_as!r}; choose one of {RESUME_AS}")
    path = resume_checkpoint(trainer.get("resume"), output_dir, tracker)
    if path is None:
        return None
    state = load_checkpoint(path)
    mid_epoch = state.get("batches_done") is not None
    done = int(state["epoch"]) + (0 if mid_epoch else 1)
    max_epochs = int(trainer.max_epochs)
    nothing_to_train = TrainlabError(
        f"trainer.resume={path} has {done} epoch(s) done; trainer.max_epochs={max_epochs} "
        f"leaves nothing to train: set trainer.max_epochs above {done}"
    )
    patience = (trainer.get("early_stopping") or {}).get("patience")
    if not mid_epoch and patience and EarlyStopping(int(patience)).stops_after(
            done - 1, int(state.get("best_epoch", -1))):
        max_epochs = done  # the early stop ended training there
        nothing_to_train = TrainlabError(
            f"trainer.resume={path} stopped early after epoch {done} (no better "
            f"{state.get('monitor', 'monitor')} for {patience} epochs): nothing to train; "
            "raise trainer.early_stopping.patience (or set it to null) to train on")
    tags = {"trainlab.resumed_from": str(path.resolve())}
    origin = state.get("mlflow_run_id")
    if max_epochs < done or (max_epochs == done and (resume_as == "new_run" or origin is None)):
        raise nothing_to_train
    if resume_as == "new_run" or origin is None:
        if origin:
            tags["trainlab.origin_run_id"] = origin
        _carry_best(path, Path(output_dir) / "checkpoints")
        return ResumePlan(path, None, Path(output_dir), tags)
    logged, run_dir, status, started_with = _run_record(tracker, origin, path)
    if max_epochs == done and status == "FINISHED":
        raise nothing_to_train  # else its run was stopped after training: it is finished now
    if path.parent.name == "checkpoints":
        run_dir = path.resolve().parent.parent
    run_dir = run_dir or Path(output_dir)
    step = int(state["global_step"])
    if logged is not None and step < logged:
        raise TrainlabError(
            f"trainer.resume={path} is at step {step}, but its MLflow run {origin} has logged "
            f"up to step {logged}; resume from the newer {run_dir / 'checkpoints' / 'last.pt'}"
            ", or add trainer.resume_as=new_run to branch off into a new run"
        )
    tags["trainlab.output_dir"] = str(run_dir)
    return ResumePlan(path, origin, run_dir, tags, started_with)


def resume_checkpoint(value: Any, output_dir: Path, tracker: Any) -> Path | None:
    """``trainer.resume`` as a file: null, ``last``, a checkpoint path, or an MLflow run id
    (or its first 8+ characters): the ``last.pt`` in the folder the run's
    ``trainlab.checkpoints`` tag names, where training keeps its checkpoints."""
    value = None if value is None else str(value)  # Hydra reads an id of digits as a number
    if value is None or not RUN_ID.fullmatch(value) or Path(value).exists():
        return resolve_resume(value, output_dir)
    from mlflow.tracking import MlflowClient

    from trainlab.store import SWEEP_ROLE_TAG, best_job_hint, find_run

    experiment_id = tracker.connect()
    if experiment_id is None:
        raise TrainlabError(f"trainer.resume={value} names an MLflow run, but logger=none has "
                            "no store to look it up in; give the checkpoint's path")
    try:
        run = find_run(MlflowClient(), value, [experiment_id])
    except TrainlabError as err:
        raise TrainlabError(f"trainer.resume={value}: {err}") from None
    if run.data.tags.get(SWEEP_ROLE_TAG) == "sweep":
        raise TrainlabError(f"trainer.resume={value}: {best_job_hint(run)}; its command, run "
                            "again, resumes the sweep (`trainlab reproduce` prints it)")
    folder = run.data.tags.get(CHECKPOINTS_TAG)
    last = Path(folder) / "last.pt" if folder else None
    if last is None or not last.is_file():
        raise TrainlabError(f"trainer.resume={value}: run {run.info.run_id} has no "
                            f"checkpoints/last.pt on this machine ({folder or 'no folder tagged'}"
                            "); give the path of a copy")
    return last


def unsent_metrics(checkpoint: Path) -> list[tuple[int, dict[str, float]]]:
    """The metrics the store had not confirmed when the checkpoint was written, and those of
    the epoch an epoch-end checkpoint closed, as ``(step, metrics)`` rows: re-sent on resume,
    as a hard kill may have lost them on the way to MLflow (what the run already has is
    dropped by the tracker, not repeated)."""
    state = load_checkpoint(checkpoint)
    rows = [(int(step), dict(values)) for step, values in state.get("logged_rows") or []]
    if state.get("batches_done") is None and state.get("metrics"):
        rows.append((int(state["global_step"]),
                     {**state["metrics"], "epoch": int(state["epoch"])}))
    return rows


def _run_record(tracker: Any, run_id: str,
                path: Path) -> tuple[int | None, Path | None, str, list[str]]:
    """The step of the last epoch the run logged (None before its first), its output dir,
    its status and the overrides it started with; a run still RUNNING in a live process is
    refused (two processes would write one run)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tracker.connect()
    client = MlflowClient()
    try:
        history = client.get_metric_history(run_id, "epoch")
        run = client.get_run(run_id)
    except MlflowException as err:
        raise TrainlabError(
            f"the checkpoint's MLflow run {run_id} is not in {client.tracking_uri}; resume "
            "against the store the run was tracked in (logger.tracking_uri), or add "
            "trainer.resume_as=new_run"
        ) from err
    if run.info.status == "RUNNING":
        verdict = judge(run)
        if verdict.alive:
            raise TrainlabError(
                f"trainer.resume={path}: its MLflow run {run_id} is still running "
                f"({verdict.reason}); stop that process first, or add "
                "trainer.resume_as=new_run to branch off into a new run"
            )
        log.warning("MLflow run %s was left RUNNING, %s; continuing it", run_id,
                    verdict.reason)
    folder = run.data.tags.get("trainlab.output_dir")
    started_with = [o for o in run.data.tags.get("trainlab.overrides", "").split()
                    if o != "(none)"]
    return (max((m.step for m in history), default=None), Path(folder) if folder else None,
            run.info.status, started_with)


def resumed_overrides(started_with: list[str], attempt: list[str]) -> list[str]:
    """The overrides a resumed run stands for: those it started with, updated by the ones
    the resume gave (``trainer.max_epochs=20``), its ``trainer.resume*`` keys left out."""
    given = {override_key(o): o for o in attempt if override_key(o) not in RESUME_KEYS}
    merged = [given.pop(override_key(o), o) for o in started_with]
    return merged + list(given.values())


def resumed_config(cfg: DictConfig, started_with: list[str], attempt: list[str]) -> DictConfig:
    """The config a resumed run trains with: the resume's, with the values the run started
    with that the resume did not give again (``seed=7``, ``optimizer.lr=0.01``). A resume
    command need not repeat them; its config records what the run really is."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from trainlab.app import config_groups

    given = {override_key(o) for o in attempt}
    groups = config_groups()
    effective = cfg.copy()
    parsed = OverridesParser.create().parse_overrides(
        [o for o in started_with if override_key(o) not in given])
    with open_dict(effective):
        for override in parsed:
            if override.key_or_group.split("/")[0] in groups or override.is_delete():
                continue  # a group the resume composes itself (a misfit is refused)
            OmegaConf.update(effective, override.key_or_group, override.value(), merge=False)
    return effective


def _carry_best(checkpoint: Path, folder: Path) -> None:
    """A branched run starts with its origin's best.pt, so its logged model is the true best."""
    best = checkpoint.parent / "best.pt"
    if best.is_file() and not (folder / "best.pt").exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(best, folder / "best.pt")
