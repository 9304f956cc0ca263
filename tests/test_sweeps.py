"""Sweeps into MLflow: parent/child runs, summaries, Optuna search, parallel launchers, compare."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import QUICK, TRAINLAB, free_port, runs_of

FAST = [*QUICK, "logger.log_model=false", "logger.log_checkpoints=false"]


def split_sweep(runs):
    """(parent, children) of the one sweep among ``runs``."""
    (parent,) = [r for r in runs if r.data.tags.get("trainlab.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def test_grid_sweep_nests_jobs_and_summarises_failures_and_seeds(run_trainlab, mlflow_client,
                                                                 tmp_path):
    proc = run_trainlab("train", "-m", "optimizer=sgd", "optimizer.lr=0.05,1e10", "seed=1,2",
                        *FAST, check=False)
    assert proc.returncode == 1, "a failed job fails the sweep, after all jobs ran"
    runs = runs_of(mlflow_client)
    parent, children = split_sweep(runs)
    assert len(runs) == 5 and len(children) == 4

    assert parent.data.tags["trainlab.command"].startswith("trainlab train -m optimizer=sgd")
    assert "optimizer.lr=0.05,1e10" in parent.data.tags["trainlab.command"]
    sweep_dir = Path(parent.data.tags["trainlab.sweep_dir"])
    assert (sweep_dir / "multirun.yaml").is_file()
    assert len([d for d in sweep_dir.iterdir() if d.is_dir()]) == 4, "one output dir per job"

    # Children are named by their swept overrides only.
    assert sorted(r.info.run_name for r in children) == [
        "optimizer.lr=0.05,seed=1", "optimizer.lr=0.05,seed=2",
        "optimizer.lr=10000000000.0,seed=1", "optimizer.lr=10000000000.0,seed=2",
    ]
    failed = [r for r in children if r.info.status == "FAILED"]
    assert len(failed) == 2
    assert all("loss became nan" in r.data.tags["trainlab.error"] for r in failed)
    assert all(r.info.status == "FINISHED" for r in children if r not in failed)

    out = proc.stdout
    assert "Sweep summary (4 jobs" in out
    assert "overrides of every job: optimizer=sgd model=mlp" in out
    table = out[out.index("Sweep summary"):].splitlines()
    assert table[3].startswith("optimizer.lr=0.05,seed="), "best job first"
    assert "optimizer.lr=0.05 " in out and "mean of 2 seeds" in out and "±" in out
    assert "FAILED TrainlabError: loss became nan" in out

    artifacts = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md"} <= artifacts
    local = mlflow_client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED", "FAILED", "FAILED",
                                           "mean of 2 seeds"]
    assert "±" in rows[-1]["note"]
    assert parent.info.status == "FAILED"


OPTUNA = [
    "-m", "hydra/sweeper=optuna", "optimizer.lr=choice(0.01,0.00001)", "hydra.sweep.dir=search",
    "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler",
    "~hydra.sweeper.sampler.n_startup_trials", "hydra.sweeper.sampler.seed=0",
    # a trial below 50 % accuracy after its first epoch is pruned
    "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
    "~hydra.sweeper.pruner.n_startup_trials", "hydra.sweeper.pruner.n_warmup_steps=0",
    "+hydra.sweeper.pruner.lower=0.5", *FAST,
]


def test_optuna_search_prunes_logs_best_and_resumes(run_trainlab, mlflow_client, tmp_path):
    import optuna

    proc = run_trainlab("train", *OPTUNA, "hydra.sweeper.n_trials=2")
    parent, children = split_sweep(runs_of(mlflow_client))
    assert len(children) == 2
    pruned = [r for r in children if "pruned" in r.data.tags]
    (kept,) = [r for r in children if "pruned" not in r.data.tags]
    assert [r.info.run_name for r in pruned] == ["optimizer.lr=1e-05"]
    assert pruned[0].data.tags["pruned"] == "epoch 1"
    assert len(mlflow_client.get_metric_history(pruned[0].info.run_id, "val/acc")) == 1
    assert kept.info.run_name == "optimizer.lr=0.01"
    assert len(mlflow_client.get_metric_history(kept.info.run_id, "val/acc")) == 2
    assert "pruned at epoch 1" in proc.stdout

    parent = mlflow_client.get_run(parent.info.run_id)
    assert parent.data.params["best.optimizer.lr"] == "0.01"
    kept_history = mlflow_client.get_metric_history(kept.info.run_id, "val/acc")
    assert parent.data.metrics["best/val/acc"] == pytest.approx(max(m.value for m in kept_history))

    # Rerunning the command continues the study in the sweep dir's storage: one more trial.
    proc = run_trainlab("train", *OPTUNA, "hydra.sweeper.n_trials=3")
    assert "2 trials done, 1 to go" in proc.stdout + proc.stderr
    study = optuna.load_study(study_name="train", storage=f"sqlite:///{tmp_path}/search/optuna.db")
    states = sorted(t.state.name for t in study.trials)
    assert len(states) == 3 and states.count("PRUNED") >= 1 and "COMPLETE" in states
    assert len(list((tmp_path / "search").glob("[0-9]_*"))) == 3, "trial i runs in dir i_..."


@pytest.mark.slow
def test_parallel_sweeps_share_one_store_without_clashes(tmp_path, tracking_uri, mlflow_client):
    """A joblib sweep (4 jobs, 2 at a time) and a second sweep start together on one store."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    commands = [
        ["train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         "optimizer.lr=1e-3,1e-2", "seed=1,2", "logger.experiment_name=par", *FAST],
        ["train", "-m", "optimizer.lr=1e-3,1e-2", "logger.experiment_name=par", *FAST],
    ]
    procs = [subprocess.Popen([str(TRAINLAB), *c], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for c in commands]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
        assert "database is locked" not in out and "already exists" not in out
    runs = runs_of(mlflow_client, "par")
    parents = [r for r in runs if r.data.tags.get("trainlab.role") == "sweep"]
    assert len(parents) == 2
    sizes = sorted(
        len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id])
        for p in parents
    )
    assert sizes == [2, 4]
    assert all(r.info.status == "FINISHED" for r in runs)
    job_dirs = {r.data.tags["trainlab.output_dir"] for r in runs if r not in parents}
    assert len(job_dirs) == 6, "no two jobs share an output dir"


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_jobs(run_trainlab, mlflow_client):
    run_trainlab("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                 "optimizer.lr=1e-3,1e-2", *FAST)
    parent, children = split_sweep(runs_of(mlflow_client))
    assert sorted(r.info.run_name for r in children) == ["optimizer.lr=0.001", "optimizer.lr=0.01"]
    assert all(r.info.status == "FINISHED" for r in children)
    sweep_dir = Path(parent.data.tags["trainlab.sweep_dir"])
    assert list(sweep_dir.glob(".submitit/*/*_result.pkl")), "jobs ran through submitit"


def test_optuna_search_space_follows_the_hydra_grammar():
    import optuna.distributions as d

    from hydra_plugins.trainlab_optuna_sweeper.optuna_sweeper import search_space

    space, fixed = search_space(
        {"optimizer.lr": "tag(log, interval(1e-4, 1e-1))", "model.depth": "int(interval(1, 4))",
         "optimizer": "choice(adam, sgd)", "data.batch_size": "range(16, 65, step=16)",
         "model.dropout": "range(0.0, 0.3, step=0.1)"},
        ["trainer.max_epochs=3", "loss=choice(ce,focal)"],
    )
    assert space["optimizer.lr"] == d.FloatDistribution(1e-4, 1e-1, log=True)
    assert space["model.depth"] == d.IntDistribution(1, 4)
    assert space["optimizer"] == d.CategoricalDistribution(["adam", "sgd"])
    assert space["data.batch_size"] == d.IntDistribution(16, 64, step=16)
    assert space["model.dropout"].high == pytest.approx(0.2)
    assert space["loss"] == d.CategoricalDistribution(["ce", "focal"])
    assert fixed == ["trainer.max_epochs=3"]


def test_runs_command_compares_runs_and_plots_curves(tracking_uri, mlflow_client, tmp_path,
                                                     capsys):
    from trainlab.compare import runs_cli

    experiment = mlflow_client.create_experiment("cmp")
    parent = mlflow_client.create_run(experiment, run_name="sweep",
                                      tags={"trainlab.role": "sweep"}).info.run_id
    curves = {"lr=0.1,seed=1": [0.5, 0.9, 0.8], "lr=0.1,seed=2": [0.6, 0.7, 0.7],
              "lr=1,seed=1": [0.2, 0.3, 0.4]}
    for name, values in curves.items():
        overrides = name.replace(",", " ")
        run = mlflow_client.create_run(experiment, run_name=name, tags={
            "mlflow.parentRunId": parent, "trainlab.overrides": overrides}).info.run_id
        for step, value in enumerate(values):
            mlflow_client.log_metric(run, "val/acc", value, step=step)
        mlflow_client.set_terminated(run, "FINISHED")
    mlflow_client.create_run(experiment, run_name="outside the sweep")

    png = tmp_path / "curves.png"
    assert runs_cli(["--tracking-uri", tracking_uri, "--experiment", "cmp", "--sweep", parent,
                     "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()[1:]
    assert lines[0].split()[:3] == ["run", "status", "overrides"]
    assert [line.split()[0] for line in lines[2:5]] == ["lr=0.1,seed=1", "lr=0.1,seed=2",
                                                        "lr=1,seed=1"]
    assert "0.9000" in lines[2] and "0.8000" in lines[2], "best and last value"
    assert "lr=0.1" in lines[5] and "0.8000 ± 0.1414" in lines[5]
    assert "outside the sweep" not in out
    assert png.stat().st_size > 10_000

    assert runs_cli(["--tracking-uri", tracking_uri, "--experiment", "nope"]) == 1
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err


def test_ui_serves_the_store_and_prints_the_run_table_url(tmp_path, tracking_uri,
                                                          mlflow_client):
    experiment = mlflow_client.create_experiment("trainlab")
    port = free_port()
    proc = subprocess.Popen(
        [str(TRAINLAB), "ui", "--port", str(port)], cwd=tmp_path, text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs"
        assert line.strip().endswith(url)
        api = (f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get"
               f"?experiment_id={experiment}")
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as page:
                    assert page.status == 200
                with urllib.request.urlopen(api, timeout=5) as answer:
                    assert b'"name": "trainlab"' in answer.read().replace(b'":"', b'": "')
                break
            except OSError:
                assert time.monotonic() < deadline, "the MLflow UI never answered"
                time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0
