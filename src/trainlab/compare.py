"""`trainlab runs`: compare tracked runs from the MLflow store.

The same table backs a sweep's summary (sweeps.py): one row per run with its status,
overrides, the metric's best and last values and its duration, plus a mean ± std row per
configuration that was repeated with several seeds.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import re
import shutil
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from trainlab.errors import TrainlabError
from trainlab.store import SWEEP_ROLE_TAG, best_job_hint, configured, existing_store, find_run

COLUMNS = ("id", "run", "status", "overrides", "best", "last", "duration")
ID_CHARS = 8  # run ids are shown (and accepted) as prefixes this long
SEED_OVERRIDE = re.compile(r"^\+*seed=\S*$")
_FLOAT = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w.])")


def short_numbers(text: str, digits: int = 4) -> str:
    """Floats cut to ``digits`` significant digits: ``lr=0.000847362913`` → ``lr=0.0008474``."""

    def shorten(match: re.Match) -> str:
        number = match.group(0)
        if re.fullmatch(r"[-+]?\d+", number):
            return number  # integers (seeds, epochs) stay exact
        return f"{float(number):.{digits}g}"

    return _FLOAT.sub(shorten, text)


@dataclass
class Row:
    """One run in a comparison; ``note`` holds its error or why it stopped early."""

    run: str
    status: str
    overrides: str
    best: float | None
    last: float | None
    duration: float | None
    note: str = ""
    run_id: str = ""
    std: float | None = None  # a seed group's standard deviation of ``best``

    def cells(self) -> list[str]:
        best = "" if self.best is None else f"{self.best:.4f}"
        if self.status.startswith("mean"):  # a seed group: best is "mean ± std"
            best = self.note
        return [
            self.run_id[:ID_CHARS],
            self.run,
            self.status,
            short_numbers(self.overrides),
            best,
            "" if self.last is None else f"{self.last:.4f}",
            "" if self.duration is None else f"{self.duration:.1f}s",
        ]


def mode_of(metric: str) -> str:
    """Losses and errors are minimised, everything else (accuracy, IoU, ...) maximised."""
    return "min" if re.search(r"loss|err|mse|mae", metric) else "max"


def rows_for(client, runs: Sequence, metric: str, mode: str) -> list[Row]:
    """Rows for ``runs``, best first by ``metric``; runs without the metric go last."""
    pick = min if mode == "min" else max
    rows = []
    for run in runs:
        history = [m.value for m in client.get_metric_history(run.info.run_id, metric)]
        finite = [v for v in history if math.isfinite(v)]
        end = run.info.end_time or None
        tags = run.data.tags
        note, status = tags.get("trainlab.error", ""), run.info.status
        if "pruned" in tags:  # MLflow has no such status; the Optuna trial has
            note, status = f"pruned at {tags['pruned']}", "PRUNED"
        rows.append(
            Row(
                run=run.info.run_name or run.info.run_id,
                status=status,
                overrides=tags.get("trainlab.overrides", ""),
                best=pick(finite) if finite else None,
                last=history[-1] if history else None,
                duration=(end - run.info.start_time) / 1000 if end else None,
                note=note,
                run_id=run.info.run_id,
            )
        )
    sign = 1 if mode == "min" else -1
    # Pruned runs stopped early: their values are not comparable with complete ones.
    return sorted(rows, key=lambda r: (r.best is None, r.status == "PRUNED",
                                       sign * (r.best or 0.0)))


def seed_groups(rows: Sequence[Row], mode: str) -> list[Row]:
    """A mean ± std row per configuration run with more than one seed (finished runs only)."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        words = row.overrides.split()
        if (row.best is None or row.status != "FINISHED"
                or not any(SEED_OVERRIDE.match(w) for w in words)):
            continue
        config = " ".join(w for w in words if not SEED_OVERRIDE.match(w))
        groups.setdefault(config, []).append(row)
    summary = []
    for config, members in groups.items():
        if len(members) < 2:
            continue
        bests = [r.best for r in members]
        mean, std = statistics.fmean(bests), statistics.stdev(bests)
        name = ",".join(p for p in members[0].run.split(",") if not SEED_OVERRIDE.match(p))
        summary.append(
            Row(run=name or "(defaults)", status=f"mean of {len(members)} seeds",
                overrides=config, best=mean, last=None, duration=None,
                note=f"{mean:.4f} ± {std:.4f}", std=std)
        )
    sign = 1 if mode == "min" else -1
    return sorted(summary, key=lambda r: sign * r.best)


def without_common_overrides(rows: Sequence[Row]) -> tuple[str, list[Row]]:
    """The overrides every row shares, and the rows showing only the ones that differ."""
    if not rows:
        return "", []
    common = set.intersection(*(set(r.overrides.split()) for r in rows))
    shared = " ".join(w for w in rows[0].overrides.split() if w in common)
    return shared, [
        dataclasses.replace(r, overrides=" ".join(w for w in r.overrides.split()
                                                  if w not in common))
        for r in rows
    ]


def header(metric: str) -> list[str]:
    return [*COLUMNS[:4], f"best {metric}", f"last {metric}", COLUMNS[6]]


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def format_table(rows: Sequence[Row], metric: str, width: int | None = None) -> str:
    """A plain-text table for the terminal, with failed/pruned notes under it.

    Wider than ``width`` characters, the overrides column is cut, then left out (a sweep's
    run names are its overrides already), then duration and last value, and only then are
    run names cut.
    """
    head = [*COLUMNS[:4], "best", "last", COLUMNS[6]]
    body = [r.cells() for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    width = width or 10**6

    def excess() -> int:
        return sum(widths) + 2 * (len(widths) - 1) - width

    def drop(name: str) -> None:
        column = head.index(name)
        for line in [*body, widths, head]:
            del line[column]

    if excess() > 0:
        widths[3] -= excess()
        if widths[3] < len(head[3]):
            drop("overrides")
    for name in ("duration", "last"):
        if excess() > 0:
            drop(name)
    if excess() > 0:
        widths[1] = max(12, widths[1] - excess())
    lines = ["  ".join(clip(cell, w).ljust(w) for cell, w in zip(line, widths, strict=True))
             .rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [clip(f"  {r.run}: {r.status} {r.note}", width) for r in rows
             if r.note and not r.status.startswith("mean")]
    title = f"{metric}: best and last value of each run"
    return "\n".join([title, *lines]
                     + (["", "not finished or stopped early:", *notes] if notes else []))


def format_markdown(rows: Sequence[Row], metric: str, shared: str = "") -> str:
    """A compact table: the overrides every row shares stated once above it, short floats."""
    head = [*header(metric), "note"]
    lines = [f"Overrides of every job: `{shared}`\n" if shared else "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [*r.cells(), "" if r.status.startswith("mean") else r.note[:120]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")
                                       for c in cells) + " |")
    return "\n".join(line for line in lines if line) + "\n"


def metric_key(text: str) -> str:
    """``optimizer.lr=0.05,loss=ce`` as part of a metric name: ``optimizer.lr:0.05,loss:ce``
    with every character MLflow refuses in names made ``_``."""
    return re.sub(r"[^\w.\- :/]", "_", text.replace("=", ":").replace(",", " ")).strip("/")


def format_csv(rows: Sequence[Row], metric: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run_id", *COLUMNS[1:4], f"best {metric}", f"last {metric}", "duration_s",
                     "note"])
    for r in rows:
        writer.writerow([r.run_id, r.run, r.status, r.overrides, r.best, r.last, r.duration,
                         r.note])
    return out.getvalue()


def latest_attempts(runs: Sequence) -> list:
    """One run per sweep job: a job rerun after a failure or a kill replaces its earlier
    attempt (same parent, same overrides); runs outside a sweep are each their own."""
    latest: dict[tuple[str, str], Any] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tags = run.data.tags
        parent = tags.get("mlflow.parentRunId")
        job = tags.get("trainlab.overrides", run.info.run_id) if parent else run.info.run_id
        latest[(parent or "", job)] = run
    return list(latest.values())


def epochs_of(client, run_id: str, steps: Sequence[int]) -> list[float]:
    """Steps as epochs: the run logs ``epoch`` at each epoch's last step; steps in between
    are placed proportionally."""
    import numpy as np

    ends = sorted((m.step, m.value + 1) for m in client.get_metric_history(run_id, "epoch"))
    if not ends:
        return list(map(float, steps))
    return list(np.interp(steps, [0, *(s for s, _ in ends)], [0, *(e for _, e in ends)]))


def plot_curves(client, runs: Sequence, metric: str, path: str) -> list[str]:
    """``metric`` against epochs for every job's latest attempt; runs that differ only by
    their seed are drawn as their mean with a band from lowest to highest, the legend
    beside the axes. Returns the legend's labels."""
    import numpy as np

    from trainlab.plots import pyplot, save_figure

    plt = pyplot()
    groups: dict[str, list] = {}
    for run in latest_attempts(runs):
        words = run.data.tags.get("trainlab.overrides", run.info.run_id).split()
        groups.setdefault(" ".join(w for w in words if not SEED_OVERRIDE.match(w)),
                          []).append(run)
    fig, ax = plt.subplots(figsize=(10, 5))
    for members in groups.values():
        curves = []
        for run in members:
            history = sorted(client.get_metric_history(run.info.run_id, metric),
                             key=lambda m: m.step)
            if history:
                epochs = epochs_of(client, run.info.run_id, [m.step for m in history])
                curves.append((epochs, [m.value for m in history]))
        if not curves:
            continue
        name = members[0].info.run_name or members[0].info.run_id[:ID_CHARS]
        if len(curves) == 1:
            ax.plot(*curves[0], marker=".", label=name)
            continue
        length = min(len(values) for _, values in curves)
        values = np.array([v[:length] for _, v in curves])
        x = curves[0][0][:length]
        label = ",".join(p for p in name.split(",") if not SEED_OVERRIDE.match(p))
        line, = ax.plot(x, values.mean(0), marker=".",
                        label=f"{label or '(defaults)'} (mean of {len(curves)} seeds)")
        ax.fill_between(x, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path, dpi=120)
    return [text.get_text() for text in legend.get_texts()]


def check_plot_path(path: str) -> None:
    """A file type matplotlib cannot write is refused before the table, not after it."""
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = ", ".join(f".{k}" for k in sorted(FigureCanvasBase.get_supported_filetypes()))
    suffix = PurePath(path).suffix
    if suffix.lower().lstrip(".") not in FigureCanvasBase.get_supported_filetypes():
        what = f"matplotlib cannot write {suffix} files" if suffix else "no file type"
        raise TrainlabError(f"--plot {path}: {what}; end the name with one of {kinds}")


# ------------------------------------------------------------------ commands
def _cleanup(client, experiment: str | None, stale_after_min: float) -> int:
    """`trainlab runs --cleanup`: one line per RUNNING run, dead ones marked KILLED."""
    from trainlab.liveness import cleanup

    if not stale_after_min > 0:
        raise TrainlabError(f"--stale-after {stale_after_min:g}: must be a number of minutes > 0")
    ids = ([experiment_named(client, experiment).experiment_id] if experiment
           else [e.experiment_id for e in client.search_experiments()])
    lines = cleanup(client, ids, stale_after_min * 60)
    print("\n".join(lines) if lines else "no RUNNING runs")
    return 0


DEFAULT_EXPERIMENT = "trainlab"
DEBUG_EXPERIMENT = "debug"  # where debug=fast|overfit|profile runs go (conf/debug/)


def experiment_named(client, name: str | None):
    """The experiment ``name``; without a name, the one the config `trainlab train` here
    runs names (``logger.experiment_name``, ``trainlab``), or else the store's only one
    besides MLflow's ``Default`` and the debug runs' (a project's own, such as the one a
    `trainlab init` project's experiment preset names)."""
    wanted = name or configured("logger.experiment_name") or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(wanted)
    if name is None and experiment is not None and wanted != DEFAULT_EXPERIMENT:
        print(f"experiment {wanted} (logger.experiment_name)")
    if experiment is None and name is None:
        experiments = client.search_experiments()
        own = [e for e in experiments if e.name not in ("Default", DEBUG_EXPERIMENT)]
        if len(own) == 1:
            debug = any(e.name == DEBUG_EXPERIMENT for e in experiments)
            print(f"experiment {own[0].name} (the store's only one"
                  + (f" besides {DEBUG_EXPERIMENT})" if debug else ")"))
            return own[0]
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TrainlabError(f"no MLflow experiment {wanted!r} in the store; choose one with "
                            f"--experiment: {', '.join(names)}")
    return experiment


def select_runs(client, experiment_id: str, sweep: str | None, where: str = "") -> list:
    """The runs of one sweep (children of its parent run, given by an id prefix), or every
    run but sweep parents; ``where`` is an MLflow search filter on top."""
    from mlflow.exceptions import MlflowException

    query = where
    if sweep:
        parent = find_run(client, sweep, [experiment_id]).info.run_id
        query = " and ".join(q for q in (f"tags.mlflow.parentRunId = '{parent}'", where) if q)
    try:
        found = client.search_runs([experiment_id], query, max_results=50000)
    except MlflowException as err:
        raise TrainlabError(f"--filter {where!r}: {err.message.splitlines()[0]}") from None
    if sweep and not found:
        raise TrainlabError(f"--sweep {sweep}: no runs have this parent run"
                            + (" and match --filter" if where else ""))
    return [r for r in found if r.data.tags.get(SWEEP_ROLE_TAG) != "sweep"]


def monitored(runs: Sequence) -> tuple[str, str | None]:
    """The metric (and its mode) the runs chose their best epoch by, when they share one
    (``trainer.monitor``: val/dice for a segmentation experiment); else val/acc."""
    choices = {(r.data.params["trainer.monitor"], r.data.params.get("trainer.monitor_mode"))
               for r in runs if "trainer.monitor" in r.data.params}  # not a sweep's parent
    if len(choices) == 1:
        metric, mode = choices.pop()
        return metric, mode if mode in ("min", "max") else None
    return "val/acc", None


def check_metric(runs: Sequence, metric: str) -> None:
    """A metric no run has is a typo: name the ones they have."""
    names = sorted({name for r in runs for name in r.data.metrics})
    if runs and metric not in names:
        raise TrainlabError(f"--metric {metric}: no run has this metric; they have "
                            f"{', '.join(names) or 'no metrics'}")


def config_of(client, run) -> dict[str, str]:
    """A run's params and every key of its logged ``config.yaml``, flattened to strings."""
    import tempfile

    import yaml

    flat = dict(run.data.params)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run.info.run_id, "config.yaml", tmp)
        except Exception:  # an older run or one stopped before its config was logged
            return flat
        with open(path) as f:
            config = yaml.safe_load(f) or {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat.setdefault(f"{prefix}{key}", str(value))

    walk(config, "")
    return flat


def format_diff(client, run_a, run_b) -> str:
    """The params and config keys whose values differ between two runs."""
    a, b = config_of(client, run_a), config_of(client, run_b)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    names = [run_a.info.run_name or run_a.info.run_id, run_b.info.run_name or run_b.info.run_id]
    if not keys:
        return f"{names[0]} and {names[1]}: same params and config"
    width = max(map(len, keys))
    head = [f"{'key':<{width}}  {run_a.info.run_id[:ID_CHARS]} {names[0]}",
            f"{'':<{width}}  {run_b.info.run_id[:ID_CHARS]} {names[1]}", ""]
    lines = [f"{k:<{width}}  {a.get(k, '(absent)')}  →  {b.get(k, '(absent)')}" for k in keys]
    return "\n".join(head + lines)


def runs_cli(args: list[str]) -> int:
    """`trainlab runs`: print a comparison table of tracked runs."""
    parser = argparse.ArgumentParser(prog="trainlab runs", description=runs_cli.__doc__)
    parser.add_argument("--experiment", help="MLflow experiment name (default: the config's "
                        "logger.experiment_name, else the store's only one besides debug; with "
                        "--cleanup: every experiment)")
    parser.add_argument("--sweep", metavar="ID", help="a sweep's parent run (an id prefix "
                        "is enough): only its jobs")
    parser.add_argument("--filter", default="", metavar="QUERY", help="MLflow search filter, "
                        "e.g. \"params.optimizer = 'sgd'\" or \"metrics.`val/acc` > 0.9\"")
    parser.add_argument("--metric", help="metric to compare (default: the runs' "
                        "trainer.monitor when they share one, else val/acc)")
    parser.add_argument("--mode", choices=("min", "max"), help="better is min or max "
                        "(default: the runs' trainer.monitor_mode, else min for losses, else max)")
    parser.add_argument("--plot", metavar="PNG", help="draw the metric's curves to this file")
    parser.add_argument("--diff", nargs=2, metavar=("RUN_A", "RUN_B"),
                        help="the params and config that differ between two runs")
    parser.add_argument("--tracking-uri", help="MLflow store (default: the one `trainlab "
                        "train` here logs to)")
    parser.add_argument("--cleanup", action="store_true", help="mark RUNNING runs whose "
                        "process is gone KILLED (every experiment, unless --experiment is given)")
    parser.add_argument("--stale-after", type=float, default=10, metavar="MINUTES",
                        help="with --cleanup: a run on another host is dead when its heartbeat "
                        "is this old (10)")
    opts = parser.parse_args(args)
    try:
        if opts.plot:
            check_plot_path(opts.plot)
        client = existing_store("--tracking-uri", opts.tracking_uri)
        if opts.cleanup:
            return _cleanup(client, opts.experiment, opts.stale_after)
        experiment = experiment_named(client, opts.experiment)
        if opts.diff:
            runs = [find_run(client, p, [experiment.experiment_id]) for p in opts.diff]
            for run in runs:
                if run.data.tags.get(SWEEP_ROLE_TAG) == "sweep":
                    raise TrainlabError(f"--diff: {best_job_hint(run)}; a sweep's parent has "
                                        "no config of its own to compare")
            print(format_diff(client, *runs))
            return 0
        runs = select_runs(client, experiment.experiment_id, opts.sweep, opts.filter)
        metric, monitor_mode = monitored(runs)
        if opts.metric and opts.metric != metric:
            metric, monitor_mode = opts.metric, None
        check_metric(runs, metric)
    except TrainlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    mode = opts.mode or monitor_mode or mode_of(metric)
    rows = rows_for(client, runs, metric, mode)
    rows += seed_groups(rows, mode)
    if opts.sweep:
        shared, rows = without_common_overrides(rows)
        print(f"overrides of every job: {shared or '(none)'}")
    print(format_table(rows, metric, shutil.get_terminal_size().columns))
    if opts.plot:
        plot_curves(client, runs, metric, opts.plot)
        print(f"curves of {metric}: {opts.plot}")
    return 0
