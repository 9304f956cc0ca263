"""`trainlab runs` and `trainlab ui`: compare tracked runs from the MLflow store.

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
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from trainlab.errors import TrainlabError

COLUMNS = ("run", "status", "overrides", "best", "last", "duration")
SWEEP_ROLE_TAG = "trainlab.role"  # "sweep" on a sweep's parent run
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


def format_table(rows: Sequence[Row], metric: str) -> str:
    """A plain-text table for the terminal, with failed/pruned notes under it."""
    header = [*COLUMNS[:3], f"best {metric}", f"last {metric}", COLUMNS[5]]
    body = [r.cells() for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.run}: {r.status} {r.note}" for r in rows
             if r.note and not r.status.startswith("mean")]
    return "\n".join(lines + (["", "not finished or stopped early:", *notes] if notes else []))


def format_markdown(rows: Sequence[Row], metric: str, shared: str = "") -> str:
    """A compact table: the overrides every row shares stated once above it, short floats."""
    header = [*COLUMNS[:3], f"best {metric}", f"last {metric}", COLUMNS[5], "note"]
    lines = [f"Overrides of every job: `{shared}`\n" if shared else "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
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
    writer.writerow([*COLUMNS[:3], f"best {metric}", f"last {metric}", "duration_s", "note"])
    for r in rows:
        writer.writerow([r.run, r.status, r.overrides, r.best, r.last, r.duration, r.note])
    return out.getvalue()


def plot_curves(client, runs: Sequence, metric: str, path: str) -> None:
    """Draw ``metric`` against its step for every run on one figure."""
    from trainlab.plots import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        history = sorted(client.get_metric_history(run.info.run_id, metric),
                         key=lambda m: m.step)
        if history:
            ax.plot([m.step for m in history], [m.value for m in history], marker=".",
                    label=run.info.run_name or run.info.run_id[:8])
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path, dpi=120)


# ------------------------------------------------------------------ commands
def _client(tracking_uri: str | None):
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient()


def _experiment(client, name: str):
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TrainlabError(f"no MLflow experiment {name!r} in the store; choose one of {names}")
    return experiment


def select_runs(client, experiment_id: str, sweep: str | None) -> list:
    """The runs of one sweep (children of its parent run), or every non-parent run."""
    if sweep:
        found = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{sweep}'")
        if not found:
            raise TrainlabError(f"--sweep {sweep}: no runs have this parent run id")
        return found
    return [r for r in client.search_runs([experiment_id])
            if r.data.tags.get(SWEEP_ROLE_TAG) != "sweep"]


def runs_cli(args: list[str]) -> int:
    """`trainlab runs`: print a comparison table of tracked runs."""
    parser = argparse.ArgumentParser(prog="trainlab runs", description=runs_cli.__doc__)
    parser.add_argument("--experiment", default="trainlab", help="MLflow experiment name")
    parser.add_argument("--sweep", help="parent run id of a sweep: only its jobs")
    parser.add_argument("--metric", default="val/acc", help="metric to compare (val/acc)")
    parser.add_argument("--mode", choices=("min", "max"),
                        help="better is min or max (default: min for losses, else max)")
    parser.add_argument("--plot", metavar="PNG", help="draw the metric's curves to this file")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI "
                        "or sqlite:///mlflow.db)")
    opts = parser.parse_args(args)
    try:
        client = _client(opts.tracking_uri)
        experiment = _experiment(client, opts.experiment)
        runs = select_runs(client, experiment.experiment_id, opts.sweep)
    except TrainlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    mode = opts.mode or mode_of(opts.metric)
    rows = rows_for(client, runs, opts.metric, mode)
    rows += seed_groups(rows, mode)
    if opts.sweep:
        shared, rows = without_common_overrides(rows)
        print(f"overrides of every job: {shared or '(none)'}")
    print(format_table(rows, opts.metric))
    if opts.plot:
        plot_curves(client, runs, opts.metric, opts.plot)
        print(f"curves of {opts.metric}: {opts.plot}")
    return 0


def ui_cli(args: list[str]) -> int:
    """`trainlab ui`: serve the MLflow UI on the configured store until Ctrl-C."""
    import subprocess

    parser = argparse.ArgumentParser(prog="trainlab ui", description=ui_cli.__doc__)
    parser.add_argument("--experiment", default="trainlab", help="experiment to open")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes (one is plenty for a personal UI)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI "
                        "or sqlite:///mlflow.db)")
    opts = parser.parse_args(args)
    import mlflow

    client = _client(opts.tracking_uri)
    uri = mlflow.get_tracking_uri()
    experiment = client.get_experiment_by_name(opts.experiment)
    page = f"#/experiments/{experiment.experiment_id}/runs" if experiment else ""
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                               uri, "--host", opts.host, "--port", str(opts.port),
                               "--workers", str(opts.workers)])
    print(f"MLflow UI on {uri}: http://{opts.host}:{opts.port}/{page}", flush=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        server.wait(timeout=30)
        return 0
