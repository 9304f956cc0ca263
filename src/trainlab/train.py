"""`trainlab train`: compose the config, build every part, fit, and track it all in MLflow.

Only hydra/omegaconf are imported at module level so `trainlab train --help` and
`--cfg job` answer without loading torch or mlflow.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from trainlab import sweeps  # noqa: F401  (registers the job-dir resolver of conf/hydra)
from trainlab.app import CONFIG_DIR, run_hydra_app
from trainlab.errors import TrainlabError

log = logging.getLogger(__name__)


def run_name_and_tags(hydra_cfg: DictConfig) -> tuple[str, dict[str, str]]:
    """A run is named by its overrides (``loss=dice,optimizer.lr=0.01``), or ``default``;
    its command names the config folders it read (``--config-dir``) to run anywhere."""
    from trainlab.app import CONFIG_DIRS_TAG, given_config_dirs
    from trainlab.sweeps import run_name

    overrides = list(hydra_cfg.overrides.task)
    name = run_name(overrides) or hydra_cfg.job.override_dirname or "default"
    dirs = given_config_dirs()
    tags = {
        "trainlab.overrides": " ".join(overrides) or "(none)",
        "trainlab.output_dir": str(Path(hydra_cfg.runtime.output_dir).resolve()),
        "trainlab.command": train_command(overrides),
    }
    if dirs:
        tags[CONFIG_DIRS_TAG] = os.pathsep.join(dirs)
    return name, tags


def train_command(overrides: list[str]) -> str:
    """The `trainlab train` command line of ``overrides``, naming the config folders this
    process reads (``--config-dir``) so that it runs anywhere."""
    from trainlab.app import config_dir_args, given_config_dirs

    return " ".join(["trainlab", "train", *config_dir_args(given_config_dirs()), *overrides])


def torchrun_rank_overrides() -> list[str]:
    """Under an outside ``torchrun``, ranks other than 0 write no output dir of their own:
    Hydra's is pointed at a temporary folder, and the run uses rank 0's (``from_rank0``)."""
    if os.environ.get("RANK", "0") == "0" or "WORLD_SIZE" not in os.environ:
        return []
    import atexit
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix="trainlab-rank")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


@dataclass
class Prepared:
    """Every part of a run, built and tried on one batch; nothing tracked yet."""

    runner: Any
    preview: Path | None  # the augmentation preview PNG, logged once the run is open
    resumed_run_id: str | None = None  # the MLflow run of the resume checkpoint
    profile: bool = False  # debug=profile: fit under torch.profiler


def prepare(cfg: DictConfig, tracker, output_dir: Path, choices: DictConfig, callbacks=(),
            device=None, resume: Path | None = None, data=None) -> Prepared:
    """Build data → model → loss → optimizer → scheduler → runner (as one DDP rank when a
    process group is up: its shard of the data), try one batch through them and load the
    ``resume`` checkpoint into them. Touches no tracking store.

    ``data`` is the checked data of :func:`trainlab.data.check.prepare_data`; a DDP worker
    passes none and checks its own copy the same way."""
    from trainlab import distributed
    from trainlab.checkpoint import save_class_names
    from trainlab.components import build
    from trainlab.data.check import prepare_data
    from trainlab.data.loaders import build_loaders
    from trainlab.data.preview import write_preview
    from trainlab.debug import limit_loaders
    from trainlab.losses import build_loss
    from trainlab.metrics import TaskMetrics
    from trainlab.models.finetune import build_model
    from trainlab.optim import build_optimizer
    from trainlab.preflight import resume_into, try_one_batch
    from trainlab.runner import loop_settings
    from trainlab.schedulers import build_scheduler, optimizer_steps
    from trainlab.threads import set_training_threads

    data = data or prepare_data(cfg, choices)
    splits, augmentation = data.splits, data.augmentation
    metrics = TaskMetrics.from_config(cfg, splits.class_names)
    metrics.check_monitor(cfg.trainer.monitor)
    device = device or distributed.job_device(distributed.select_device(cfg.trainer.accelerator))
    set_training_threads(device, int(cfg.data.get("num_workers", 0)), distributed.world_size())
    train_loader, val_loader = build_loaders(
        splits, cfg.data, int(cfg.seed), device, augmentation,
        rank=distributed.rank(), world_size=distributed.world_size(),
    )
    train_loader, val_loader = limit_loaders(train_loader, val_loader, cfg.get("debug"))
    model, model_callbacks = build_model(cfg.model, choices.get("model"))
    loss = build_loss(cfg.loss, choices.get("loss"), cfg.data)
    optimizer = build_optimizer(cfg.optimizer, model, choices.get("optimizer"))
    scheduler = build_scheduler(
        cfg.scheduler, optimizer, choices.get("scheduler"),
        steps_per_epoch=optimizer_steps(len(train_loader), cfg.trainer.accumulate_grad_batches),
        max_epochs=int(cfg.trainer.max_epochs),
    )
    precision = build(cfg.precision, "precision", choices.get("precision"))
    runner = build(loop_settings(cfg.trainer), "trainer", choices.get("trainer"))(
        model=model,
        loss=loss,
        optimizer=optimizer,
        train_loader=train_loader,
        val_loader=val_loader,
        tracker=tracker,
        checkpoint_dir=output_dir / "checkpoints",
        precision=precision,
        scheduler=scheduler,
        metrics=metrics,
        device=device,
        callbacks=(*callbacks, *model_callbacks, *configured_callbacks(cfg.trainer, choices)),
    )
    try_one_batch(runner, cfg.data, choices)
    run_id = resume_into(runner, resume) if resume is not None else None
    preview = None
    if distributed.is_main_process():  # only now: a refused run leaves its folder empty
        if splits.class_names:
            save_class_names(splits.class_names, output_dir / "checkpoints")
        drawn_from = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, ["data", "augment", "seed"]),
                                       resolve=True)
        preview = write_preview(splits, augmentation, output_dir / "augment_preview.png",
                                seed=cfg.seed, key=drawn_from)
    return Prepared(runner, preview, run_id, profile=bool(cfg.get("debug", {}).get("profile")))


def configured_callbacks(trainer: DictConfig, choices: DictConfig) -> list:
    """``trainer.callbacks`` from YAML, built; they run after the ones the code adds."""
    from trainlab.components import build

    nodes = trainer.get("callbacks") or []
    return [build(node, "trainer", choices.get("trainer")) for node in nodes]


def train_prepared(prepared: Prepared, tracker, output_dir: Path):
    """Fit the prepared parts with ``tracker`` (open by now), then log checkpoints and the
    best epoch's model."""
    from trainlab import distributed
    from trainlab.checkpoint import CHECKPOINTS_TAG, CLASS_NAMES, tracked_files
    from trainlab.debug import profiled

    runner = prepared.runner
    runner.tracker = tracker
    if prepared.preview is not None:
        tracker.log_artifact(prepared.preview, "preview")
    checkpoints = output_dir / "checkpoints"
    tracker.set_tags({CHECKPOINTS_TAG: str(checkpoints.resolve())})
    try:
        with profiled(prepared.profile, output_dir, tracker):
            result = runner.fit()
    finally:
        if tracker.log_checkpoints:
            for path in tracked_files(checkpoints):
                tracker.log_artifact(path, "checkpoints")
        elif (checkpoints / CLASS_NAMES).is_file():  # what `trainlab predict` names classes
            tracker.log_artifact(checkpoints / CLASS_NAMES, "checkpoints")
    if distributed.is_main_process():
        log_best_model(runner, tracker, checkpoints / "best.pt")
    return result


def fit(cfg: DictConfig, tracker, output_dir: Path, choices: DictConfig, callbacks=(),
        device=None, resume: Path | None = None, data=None):
    """Prepare every part and train them, logging to ``tracker`` (a DDP rank's whole job)."""
    prepared = prepare(cfg, tracker, output_dir, choices, callbacks, device, resume, data)
    return train_prepared(prepared, tracker, output_dir)


def log_best_model(runner, tracker, best_path: Path) -> None:
    """Log the weights of the best epoch as the run's MLflow model, as ``logger.log_model``
    asks: now, never, or (a sweep's job with ``best``) by the sweep when it ends, if this
    job is its best: ``best_path`` then waits with an input example beside it."""
    from trainlab.checkpoint import MODEL_EPOCH_TAG, load_checkpoint, save_input_example
    from trainlab.tracker import AT_SWEEP_END, NEVER

    pruned = any(getattr(callback, "pruned_at", None) for callback in runner.callbacks)
    when = tracker.model_logging(pruned=pruned)
    if when == NEVER:
        return
    example = next(iter(runner.val_loader))[0][:2].cpu().numpy()
    if when == AT_SWEEP_END:
        save_input_example(example, best_path.parent)
        return
    model = runner.eval_model  # the average of the weights with trainer.ema
    if best_path.is_file():
        model.load_state_dict(load_checkpoint(best_path)["model"])
    if tracker.log_model(model.cpu().eval(), example):  # else owed: `trainlab sync` tags it
        tracker.set_tags({MODEL_EPOCH_TAG: runner.best_epoch + 1})


def run(cfg: DictConfig) -> float:
    """One training job; returns the best value of ``trainer.monitor`` for sweepers.

    The order is the contract: check the config, build every part and try one batch, fit a
    resume checkpoint into them, and only then open (or reopen) the MLflow run and train.
    More than one device: the job spawns the DDP workers (one output dir, one MLflow run
    that rank 0 logs into); under an outside ``torchrun`` each process joins its group.
    """
    from trainlab.config_check import RESUME_COMMAND_TAG, check_config, resume_as_typed
    from trainlab.sweeps import finished_job, job_callbacks

    hydra_cfg = HydraConfig.get()
    done = finished_job(hydra_cfg, cfg.trainer.monitor, cfg.trainer.monitor_mode)
    if done is not None:  # a rerun sweep: this job finished in an earlier attempt
        return done
    choices = OmegaConf.to_container(hydra_cfg.runtime.choices)
    resume_as_typed(cfg, hydra_cfg.overrides.task)
    # before anything is built, read or tracked
    check_config(cfg, choices, overrides=hydra_cfg.overrides.task)

    from trainlab import distributed
    from trainlab.components import build
    from trainlab.data.check import log_to_run, prepare_data
    from trainlab.late_model import log_model_if_owed
    from trainlab.outbox import SPOOL_DIR
    from trainlab.provenance import record as record_provenance
    from trainlab.resume import (
        plan_resume,
        resume_checkpoint,
        resumed_config,
        resumed_overrides,
        unsent_metrics,
    )
    from trainlab.seeding import seed_everything
    from trainlab.sync import sync_before_resume
    from trainlab.tracker import NullTracker
    from trainlab.tracking import comparable_params

    output_dir = Path(hydra_cfg.runtime.output_dir)
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    launch = distributed.plan_launch(cfg.trainer.accelerator, cfg.trainer.get("devices", 1))
    data = prepare_data(cfg, choices)  # every file, mask and label checked before MLflow
    log.info("%s", data.report.text())
    device = None
    if launch.external:
        device = distributed.init_process_group(launch, int(os.environ["RANK"]))
        output_dir = Path(distributed.from_rank0(str(output_dir)))  # the others made none
    tracker = build(cfg.logger, "logger", choices.get("logger"))
    hydra_dir = Path(hydra_cfg.runtime.output_dir) / ".hydra"
    plan = None
    if distributed.is_main_process():  # refusals leave the old run as it was
        plan = plan_resume(cfg.trainer, output_dir, tracker)
        resume = plan.checkpoint if plan else None
        if plan:
            output_dir = plan.output_dir  # best.pt and the checkpoints go on where they were
    else:
        resume = resume_checkpoint(cfg.trainer.get("resume"), output_dir, tracker)
    if launch.spawns:  # the workers build their own parts; these only check them
        device = distributed.select_device("cpu")
    prepared = prepare(cfg, tracker, output_dir, choices, job_callbacks(hydra_cfg),
                       device=device, resume=resume, data=data)
    if not distributed.is_main_process():
        train_prepared(prepared, NullTracker.like(cfg.logger), output_dir)
        return float("nan")
    run_name, tags = run_name_and_tags(hydra_cfg)
    run_id = plan.run_id if plan else None
    logged_cfg, attempt_dir = cfg, ""
    if run_id:  # the run stands for what it started with, updated by this resume
        attempt = list(hydra_cfg.overrides.task)
        overrides = resumed_overrides(plan.started_with, attempt)
        logged_cfg = resumed_config(cfg, plan.started_with, attempt)
        tags.update({"trainlab.overrides": " ".join(overrides) or "(none)",
                     "trainlab.command": train_command(overrides),
                     RESUME_COMMAND_TAG: tags["trainlab.command"]})
        attempt_dir = f"resumes/step_{prepared.runner.global_step}/"
    if plan:
        tags.update(plan.tags)
    if run_id:
        sync_before_resume(output_dir / SPOOL_DIR, run_id)
    with tracker.run(run_name, tags, run_id=run_id, spool_dir=output_dir / SPOOL_DIR):
        record_provenance(tracker, hydra_cfg.runtime.cwd)
        tracker.log_datasets(data.splits, OmegaConf.to_container(cfg.data, resolve=True),
                             choices.get("data") or "data")
        tracker.log_params(comparable_params(logged_cfg, choices))
        tracker.log_text(OmegaConf.to_yaml(logged_cfg, resolve=True), "config.yaml")
        if attempt_dir:  # the resume's own config and Hydra records, beside the run's
            tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), f"{attempt_dir}config.yaml")
        tracker.log_artifacts(hydra_dir, f"{attempt_dir}.hydra")
        log_to_run(data.report, tracker)
        if run_id:
            tracker.log_metric_series(unsent_metrics(resume))
        if launch.spawns:
            # workers have no HydraConfig: hand them the config with every value resolved
            resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
            best, best_epoch = distributed.spawn_fit(
                fit, launch, resolved, output_dir, choices, tracker.run_id, resume
            )
        else:
            result = train_prepared(prepared, tracker, output_dir)
            best, best_epoch = result.best, result.best_epoch
    log_model_if_owed(output_dir / SPOOL_DIR, tracker)  # the server answered at the close
    log.info("best %s = %.4f (epoch %d)", cfg.trainer.monitor, best, best_epoch + 1)
    return best


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except TrainlabError as err:
        if HydraConfig.get().mode == RunMode.RUN:
            for line in str(err).splitlines():
                print(f"error: {line}", file=sys.stderr)
            remove_refused_output_dir(HydraConfig.get())
            raise SystemExit(1) from None
        raise JobFailed(f"error: {err}") from None  # in a sweep: the others go on


class JobFailed(CompactHydraException):
    """A sweep job's error, which Hydra reports under the job's overrides as this message
    alone (a traceback is for bugs, not for a bad value or a file)."""


def remove_refused_output_dir(hydra_cfg: DictConfig) -> None:
    """A refused run leaves no folder behind: its output dir goes when it holds nothing but
    Hydra's own records of the attempt (``.hydra/`` and the job's log), and so do the
    parents that are then empty, up to the working directory."""
    import shutil

    folder = Path(hydra_cfg.runtime.output_dir).resolve()
    records = {".hydra", f"{hydra_cfg.job.name}.log"}
    if not folder.is_dir() or any(entry.name not in records for entry in folder.iterdir()):
        return
    root = logging.getLogger()
    for handler in list(root.handlers):  # the job's log file is open: close it first
        if Path(getattr(handler, "baseFilename", "/")).parent == folder:
            handler.close()
            root.removeHandler(handler)
    shutil.rmtree(folder, ignore_errors=True)
    cwd = Path(hydra_cfg.runtime.cwd).resolve()
    parent = folder.parent
    while parent != cwd and cwd in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def cli(args: list[str]) -> int:
    """`trainlab train ARGS`."""
    from trainlab.sweeps import close_open_sweeps

    try:
        return run_hydra_app(main, "train", [*args, *torchrun_rank_overrides()])
    except KeyboardInterrupt:
        close_open_sweeps("KILLED")
        raise
    finally:
        close_open_sweeps()
