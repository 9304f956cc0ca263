"""`trainlab reproduce RUN_ID`: what it takes to repeat a tracked run, here and now.

Reads what every training run records (trainlab.provenance: the git commit and uncommitted
diff, the installed packages; the overrides and the resolved ``config.yaml``) and prints:
the code to check out, the packages that differ from this environment, the config values
today's configs would give differently, and the command that repeats the run with those
values pinned. ``--run`` runs that command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainlab.app import CONFIG_DIRS_TAG, compose, config_dir_args, take_config_dirs
from trainlab.config_check import RESUME_COMMAND_TAG, RESUME_KEYS, override_key
from trainlab.errors import TrainlabError
from trainlab.provenance import (
    COMMIT_TAG,
    DIFF_ARTIFACT,
    DIRTY_TAG,
    PACKAGES_ARTIFACT,
    git_state,
    installed_packages,
    parse_requirements,
)
from trainlab.store import (
    BEST_RUN_TAG,
    STUDY_TAG,
    SWEEP_ROLE_TAG,
    best_job_hint,
    existing_store,
    find_run,
)

MISSING = object()
PLAIN = re.compile(r"^[\w./:+@-]+$")  # a string Hydra's override grammar takes unquoted


@dataclass
class Plan:
    """Everything `trainlab reproduce` reports about one run."""

    run_id: str
    overrides: list[str]
    commit: str | None = None
    dirty: bool = False
    diff_file: Path | None = None
    package_changes: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)  # overrides restoring changed values
    packages_recorded: bool = True
    sweep: bool = False  # a sweep's parent: its command runs every job again
    config_dirs: list[str] = field(default_factory=list)  # --config-dir of the command
    recorded_dirs: list[str] = field(default_factory=list)  # the run's own --config-dir

    @property
    def command(self) -> list[str]:
        return ["trainlab", "train", *config_dir_args(self.config_dirs), *self.overrides,
                *self.pinned]

    def where_configs(self) -> str:
        """How to give this command the run's configs."""
        ran = (f"the run read configs from {', '.join(self.recorded_dirs)}" if
               self.recorded_dirs else "the run read configs from its working folder's conf/")
        return (f"{ran}; name that folder (or a copy of it) with `trainlab reproduce "
                f"--config-dir DIR {self.run_id[:8]}`")

    @property
    def fresh_keys(self) -> list[str]:
        """What a sweep's command sets anew so that it starts a new sweep."""
        return [o.partition("=")[0] for o in self.overrides
                if o.startswith(("hydra.sweep.dir=", "hydra.sweeper.study_name="))]


def override_value(value: Any) -> str:
    """``value`` in Hydra's override grammar."""
    if isinstance(value, str):
        return value if PLAIN.match(value) else json.dumps(value)
    return json.dumps(value)


def config_pins(logged: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Overrides that turn today's composed config ``now`` into the run's ``logged`` one."""
    pins = []
    for key, value in logged.items():
        current = now.get(key, MISSING)
        if current is MISSING:
            pins.append(f"+{key}={override_value(value)}")
        elif current != value:
            pins.append(f"{key}={override_value(value)}")
    pins += [f"~{key}" for key in now if key not in logged]
    return pins


def package_changes(logged: dict[str, str], here: dict[str, str]):
    """``(name, version of the run, version here)`` of every package that differs."""
    names = sorted(set(logged) | set(here))
    return [(n, logged.get(n), here.get(n)) for n in names if logged.get(n) != here.get(n)]


def _download(run_id: str, path: str, into: Path) -> Path | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        dst_path=str(into)))
    except (MlflowException, OSError):
        return None


def plan_for(run_id: str, workdir: Path, config_dirs: list[str] = (),
             tracking_uri: str | None = None) -> Plan:
    """Read the run from MLflow and compare it with this environment and today's configs,
    on ``config_dirs`` (else the run's own ``--config-dir`` folders, where they exist).

    A sweep's parent is repeated by its own command line (``-m`` and its ``hydra.``
    overrides included); its code and packages are those its best job recorded."""
    from omegaconf import OmegaConf

    from trainlab.tracking import flatten

    client = existing_store("--tracking-uri", tracking_uri)
    run = find_run(client, run_id)
    run_id = run.info.run_id
    tags = run.data.tags
    if tags.get(SWEEP_ROLE_TAG) == "sweep":
        if not tags.get(BEST_RUN_TAG):
            raise TrainlabError(f"{best_job_hint(run)}; no job of it finished, so nothing "
                                "records the code and packages it ran with")
        plan = _plan_from(client.get_run(tags[BEST_RUN_TAG]), workdir, run_id,
                          fresh_sweep(shlex.split(tags["trainlab.command"])[2:],
                                      tags.get(STUDY_TAG)), config_dirs)
        plan.sweep = True
        return plan
    # Hydra's record, quoting kept; a resumed run stands for the tag's merged overrides
    overrides_file = None if RESUME_COMMAND_TAG in tags else _download(
        run_id, ".hydra/overrides.yaml", workdir)
    if overrides_file is not None:
        overrides = list(OmegaConf.load(overrides_file))
    else:
        overrides = [o for o in tags.get("trainlab.overrides", "").split() if o != "(none)"]
    # a resumed run is repeated from its start, not from a checkpoint of the original
    overrides = [o for o in overrides if override_key(o) not in RESUME_KEYS]
    plan = _plan_from(run, workdir, run_id, overrides, config_dirs)
    config = _download(run_id, "config.yaml", workdir)
    if config is not None:
        logged = flatten(OmegaConf.to_container(OmegaConf.load(config)))
        try:
            pins = pins_for(logged, overrides)
        except TrainlabError as err:  # its configs are not on this search path
            raise TrainlabError(f"{err}; {plan.where_configs()}") from None
        plan.pinned = [pin for pin in pins if override_key(pin) not in RESUME_KEYS]
    return plan


def fresh_sweep(command: list[str], study: str | None) -> list[str]:
    """A sweep's command that starts a new sweep: a sweep dir (and for Optuna a study) of
    its own, where the recorded ones would reopen the old sweep and skip every job."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    fresh = [f"hydra.sweep.dir=${{paths.outputs}}/multiruns/reproduce-{stamp}"]
    if study:
        fresh.append(f"hydra.sweeper.study_name={study}-reproduce-{stamp}")
    flag, *overrides = command  # -m
    return [flag, *fresh, *(o for o in overrides if override_key(o) not in
                            ("hydra.sweep.dir", "hydra.sweeper.study_name"))]


def _plan_from(recorded: Any, workdir: Path, run_id: str, overrides: list[str],
               config_dirs: list[str]) -> Plan:
    """A plan with the code and packages the run ``recorded`` ran with, on ``config_dirs``
    or else the config folders it recorded that exist here (put on the search path)."""
    tags = recorded.data.tags
    recorded_dirs = [d for d in tags.get(CONFIG_DIRS_TAG, "").split(os.pathsep) if d]
    if not config_dirs:
        config_dirs = [d for d in recorded_dirs if Path(d).is_dir()]
        take_config_dirs(config_dir_args(config_dirs))
    plan = Plan(run_id=run_id, overrides=overrides, commit=tags.get(COMMIT_TAG),
                dirty=tags.get(DIRTY_TAG) == "true", config_dirs=list(config_dirs),
                recorded_dirs=recorded_dirs)
    if plan.dirty:
        plan.diff_file = _download(recorded.info.run_id, DIFF_ARTIFACT, workdir)
    packages = _download(recorded.info.run_id, PACKAGES_ARTIFACT, workdir)
    if packages is not None:
        plan.package_changes = package_changes(parse_requirements(packages.read_text()),
                                               installed_packages())
    plan.packages_recorded = packages is not None
    return plan


def pins_for(logged: dict[str, Any], overrides: list[str]) -> list[str]:
    """:func:`config_pins` of today's config, pinning set values before values that only
    follow them (``data.dataset.seed: ${seed}`` is right again once ``seed`` is)."""
    from omegaconf import OmegaConf

    from trainlab.tracking import flatten

    def differences(extra: list[str]) -> tuple[list[str], dict[str, Any]]:
        cfg = compose("train", [*overrides, *extra])
        resolved = flatten(OmegaConf.to_container(cfg, resolve=True))
        return config_pins(logged, resolved), flatten(OmegaConf.to_container(cfg))

    pins, raw = differences([])
    direct = [pin for pin in pins if "${" not in str(raw.get(override_key(pin), ""))]
    if direct == pins:
        return pins
    return direct + differences(direct)[0]


def report(plan: Plan, here_commit: str | None, here_dirty: bool) -> str:
    lines = [f"run {plan.run_id}"]
    if plan.commit:
        same = "this checkout" if plan.commit == here_commit and not here_dirty else None
        lines.append(f"code:     git checkout {plan.commit}" + (f"   (= {same})" if same else ""))
        if plan.diff_file:
            lines.append(f"          git apply {plan.diff_file}   (it ran with uncommitted "
                         "changes)")
    else:
        lines.append("code:     not in a git repository when it ran")
    if plan.package_changes:
        lines.append(f"packages: {len(plan.package_changes)} differ (run → here):")
        lines += [f"          {name} {old or '-'} → {new or '-'}"
                  for name, old, new in plan.package_changes]
        pins = [f"{name}=={old}" for name, old, _ in plan.package_changes if old]
        if pins:
            lines.append("          pip install " + " ".join(shlex.quote(p) for p in pins))
    elif plan.packages_recorded:
        lines.append("packages: the same as here")
    else:
        lines.append("packages: not recorded in the run")
    if plan.sweep:
        lines.append("config:   a sweep: each job's values are in its own run "
                     "(`trainlab reproduce JOB_ID` pins them)")
        lines.append(f"sweep:    a new one (its own {' and '.join(plan.fresh_keys)}): every "
                     f"job runs again, run {plan.run_id[:8]} is left as it is")
    elif plan.pinned:
        lines.append(f"config:   {len(plan.pinned)} values differ from today's configs, pinned "
                     "in the command: " + " ".join(plan.pinned))
    else:
        lines.append("config:   today's configs give the same values")
    lines.append("command:  " + shlex.join(plan.command))
    return "\n".join(lines)


def _drop_unreferenced(workdir: Path) -> None:
    """Remove every downloaded file but the uncommitted diff the report tells the user to
    `git apply`: a plain `reproduce` of a clean run leaves nothing in the temp dir."""
    diff_name = Path(DIFF_ARTIFACT).name
    for path in workdir.iterdir():
        if path.name != diff_name:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if not any(workdir.iterdir()):
        workdir.rmdir()


def reproduce_cli(args: list[str]) -> int:
    """`trainlab reproduce RUN_ID [--run] [--tracking-uri URI]`."""
    parser = argparse.ArgumentParser(
        prog="trainlab reproduce",
        description="Print the code, packages, config and command that repeat a run.",
    )
    parser.add_argument("run_id", help="the MLflow run id")
    parser.add_argument("--run", action="store_true", help="run the command now, here")
    parser.add_argument("--tracking-uri", help="MLflow store (default: the one `trainlab "
                        "train` here logs to)")
    parser.add_argument("--into", type=Path, help="keep the downloaded files (config, diff, "
                        "packages) in this folder")
    parser.add_argument("--config-dir", "-cd", action="append", default=[], metavar="DIR",
                        help="the run's config folder here (repeatable; default: the ones "
                        "it was trained with, where they exist)")
    opts = parser.parse_args(args)
    take_config_dirs(config_dir_args(opts.config_dir))
    config_dirs = [str(Path(d).expanduser().resolve()) for d in opts.config_dir]
    workdir = opts.into or Path(tempfile.mkdtemp(prefix=f"reproduce-{opts.run_id[:8]}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        plan = plan_for(opts.run_id, workdir, config_dirs, opts.tracking_uri)
    except TrainlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if not opts.into:  # a temp folder is kept only for the diff the report points to
            _drop_unreferenced(workdir)
    here = git_state(".")
    print(report(plan, here.commit if here else None, bool(here and here.dirty)))
    if not opts.run:
        return 0
    from trainlab.train import cli as train

    return train(plan.command[2:])
