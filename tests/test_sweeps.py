"""Sweeps into MLflow: parent/child runs, summaries, Optuna search, parallel launchers, compare."""

from __future__ import annotations

import csv
import io
import os
import re
import shlex
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import QUICK, TRAINLAB, free_port, runs_of

FAST = [*QUICK, "logger.log_model=none"]


def split_sweep(runs):
    """(parent, children) of the one sweep among ``runs``."""
    (parent,) = [r for r in runs if r.data.tags.get("trainlab.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


@pytest.mark.slow
def test_grid_sweep_nests_jobs_and_summarises_failures_and_seeds(run_trainlab, mlflow_client,
                                                                 tmp_path):
    note = "x" * 300  # a long override: job dirs must stay within filesystem limits
    grid = ["train", "-m", "hydra.sweep.dir=grid", "optimizer=sgd",
            "optimizer.lr=0.0512345678,1e10", "seed=1,2", f"++data.note={note}", *FAST]
    proc = run_trainlab(*grid, check=False)
    assert proc.returncode == 1, "a failed job fails the sweep, after all jobs ran"
    runs = runs_of(mlflow_client)
    parent, children = split_sweep(runs)
    assert len(runs) == 5 and len(children) == 4
    assert parent.info.run_name == "optimizer.lr × seed, 4 jobs"
    assert parent.data.tags["trainlab.command"] == (
        "trainlab train -m hydra.sweep.dir=grid optimizer=sgd optimizer.lr=0.0512345678,1e10 "
        f"seed=1,2 ++data.note={note} " + " ".join(FAST))
    sweep_dir = Path(parent.data.tags["trainlab.sweep_dir"])
    assert (sweep_dir / "multirun.yaml").is_file()
    job_dirs = [d.name for d in sweep_dir.iterdir() if d.is_dir()]
    assert len(job_dirs) == 4 and all(len(d) <= 120 for d in job_dirs), job_dirs
    assert any(d.startswith("0_") and "optimizer.lr=0.05123," in d for d in job_dirs)

    # Children are named by their swept overrides only, floats shortened.
    assert sorted(r.info.run_name for r in children) == [
        "optimizer.lr=0.05123,seed=1", "optimizer.lr=0.05123,seed=2",
        "optimizer.lr=1e+10,seed=1", "optimizer.lr=1e+10,seed=2",
    ]
    # Params for comparing: group choices and values a user sets, no structural keys.
    params = children[0].data.params
    assert {"optimizer": "sgd", "model": "mlp", "loss": "ce", "data": "digits"}.items() \
        <= params.items()
    assert params["optimizer.lr"] in ("0.0512345678", "10000000000.0")
    assert 25 <= len(params) <= 50, sorted(params)
    assert not [k for k in params if "_target_" in k or k.startswith("logger.")
                or k in ("task_name", "trainer.progress_bar", "model.num_classes")]
    failed = [r for r in children if r.info.status == "FAILED"]
    assert len(failed) == 2
    assert all("loss became nan" in r.data.tags["trainlab.error"] for r in failed)
    finished = [r for r in children if r not in failed]
    assert all(r.info.status == "FINISHED" for r in finished)

    out = proc.stdout
    assert "Sweep summary (4 jobs" in out
    assert "overrides of every job: hydra.sweep.dir=grid" not in out
    assert "overrides of every job: optimizer=sgd ++data.note=" in out
    table = out[out.index("Sweep summary"):].splitlines()
    assert table[4].split()[1].startswith("optimizer.lr=0.05123,seed="), "best job first"
    assert max(map(len, table[1:9])) <= 80, "fits the terminal"
    assert "optimizer.lr=0.05123 " in out and "mean of 2 seeds" in out and "±" in out
    assert "FAILED TrainlabError: loss became nan" in out
    # a failed job is its error line under Hydra's line naming the job, not a traceback
    assert "Traceback" not in proc.stderr
    assert re.search(r"Error executing job with overrides: \[[^\n]*"
                     r"'optimizer.lr=10000000000.0'[^\n]*\]\nerror: loss became nan at epoch 1",
                     proc.stderr), proc.stderr[-3000:]

    # The parent can be sorted and compared like a run.
    parent = mlflow_client.get_run(parent.info.run_id)
    bests = {r.info.run_id: max(m.value for m in mlflow_client.get_metric_history(
        r.info.run_id, "val/acc")) for r in finished}
    assert parent.data.metrics["best/val/acc"] == pytest.approx(max(bests.values()))
    assert parent.data.tags["trainlab.best_run"] == max(bests, key=bests.get)
    seeds = "seeds/optimizer.lr:0.05123/val/acc"
    assert parent.data.metrics[f"{seeds}_mean"] == pytest.approx(sum(bests.values()) / 2)
    assert parent.data.metrics[f"{seeds}_std"] > 0
    artifacts = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md"} <= artifacts
    local = mlflow_client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED", "FAILED", "FAILED",
                                           "mean of 2 seeds"]
    assert "±" in rows[-1]["note"]
    summary = mlflow_client.download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))
    text = Path(summary).read_text()
    assert text.count(note) == 1, "shared overrides are stated once, above the table"
    assert "0.0512345678" not in text and "| optimizer.lr=0.05123 seed=1 |" in text
    assert parent.info.status == "FAILED"

    # The parent trained nothing: eval points to its best job; reproduce gives the sweep's
    # own command line
    short = parent.info.run_id[:8]
    refused = run_trainlab("eval", f"run_id={short}", check=False)
    assert refused.returncode == 1
    assert "is the parent of the sweep 'optimizer.lr × seed, 4 jobs'" in refused.stderr
    assert f"its best job is {parent.data.tags['trainlab.best_run'][:8]}" in refused.stderr
    refused = run_trainlab("train", *FAST, f"trainer.resume={short}", check=False)
    assert refused.returncode == 1
    assert "resumes the sweep (`trainlab reproduce` prints it)" in refused.stderr
    # in a sweep dir of its own
    command = shlex.split(run_trainlab("reproduce", short).stdout.splitlines()[-1]
                          .removeprefix("command:"))
    recorded = shlex.split(parent.data.tags["trainlab.command"])
    assert command[:3] == recorded[:3] == ["trainlab", "train", "-m"]
    assert command[3].startswith("hydra.sweep.dir=${paths.outputs}/multiruns/reproduce-")
    assert command[4:] == recorded[4:] and recorded[3] == "hydra.sweep.dir=grid"

    # The same command again: finished jobs are skipped, failed ones rerun, same parent.
    proc = run_trainlab(*grid, check=False)
    assert (proc.stdout + proc.stderr).count("finished in an earlier attempt") == 2
    runs = runs_of(mlflow_client)
    again, children = split_sweep(runs)
    assert again.info.run_id == parent.info.run_id and len(runs) == 7
    assert sorted(r.info.status for r in children) == ["FAILED"] * 4 + ["FINISHED"] * 2


OPTUNA = [
    "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=random", "hydra.sweep.dir=search",
    "optimizer.lr=choice(0.00001,0.02,0.01)",  # seed 42 draws 0.02, then 1e-05
    # a trial below 50 % accuracy after its first epoch is pruned
    "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
    "~hydra.sweeper.pruner.n_startup_trials", "hydra.sweeper.pruner.n_warmup_steps=0",
    "+hydra.sweeper.pruner.lower=0.5", *QUICK, "logger.log_model=all",
    "data.batch_size=16",
]
TESTS = Path(__file__).resolve().parent
# the same, with Ctrl-C pressed once at the end of the first epoch of a trial with lr 1e-05
OPTUNA_CTRL_C = [*OPTUNA, "trainer.callbacks=[{_target_:ctrl_c_once.CtrlCOnce,"
                          "marker:ctrl_c_pressed,below_lr:0.0001}]"]


@pytest.mark.slow
def test_optuna_search_prunes_resumes_and_never_repeats_a_trial(mlflow_client, tmp_path,
                                                                run_trainlab, tracking_uri):
    import optuna

    # Interrupted (Ctrl-C) in its second trial (lr 1e-05), after that trial's first epoch ...
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([str(TRAINLAB), "train", *OPTUNA_CTRL_C, "hydra.sweeper.n_trials=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, (proc.stdout + proc.stderr)[-3000:]
    assert "interrupted at epoch 1" in proc.stdout + proc.stderr

    # ... then rerun until the study holds 4 trials.
    proc = run_trainlab("train", *OPTUNA_CTRL_C, "hydra.sweeper.n_trials=4", env=env)
    assert "1 trials done, 3 to go" in proc.stdout + proc.stderr
    study = optuna.load_study(study_name="train", storage=f"sqlite:///{tmp_path}/search/optuna.db")
    (interrupted,) = [t for t in study.trials if t.state.name == "FAIL"]
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == interrupted.number]
    assert retry.params == interrupted.params and retry.state.name in ("COMPLETE", "PRUNED")
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 4

    runs = runs_of(mlflow_client)
    parent, children = split_sweep(runs)
    assert len([r for r in runs if r.data.tags.get("trainlab.role") == "sweep"]) == 1, \
        "one parent per study across reruns"
    assert parent.info.run_name == "optimizer.lr, 4 trials"
    trained = [r.info.run_name for r in children if r.info.status != "KILLED"]
    assert len(trained) == len(set(trained)), "no completed point is trained twice"
    ran = [t for t in study.trials if t.state.name != "FAIL" and "same_as_trial" not in
           t.user_attrs]
    assert len(trained) == len(ran)

    pruned = [r for r in children if "pruned" in r.data.tags and r.info.status != "KILLED"]
    assert [r.info.run_name for r in pruned] == ["optimizer.lr=1e-05"]
    assert pruned[0].data.tags["pruned"] == "epoch 1"
    assert len(mlflow_client.get_metric_history(pruned[0].info.run_id, "val/acc")) == 1
    # logger.log_model=all: every trial that ran to its end logged its model, a pruned one not
    with_model = {m.source_run_id for m in mlflow_client.search_logged_models(
        [parent.info.experiment_id])}
    assert with_model == {r.info.run_id for r in children
                          if r.info.status == "FINISHED" and "pruned" not in r.data.tags}
    summary = proc.stdout[proc.stdout.index("Sweep summary"):].splitlines()
    assert "PRUNED" in summary[-1] or "pruned at epoch 1" in proc.stdout

    best = study.best_trial
    assert parent.data.tags["best.optimizer.lr"] == str(best.params["optimizer.lr"])
    assert parent.data.metrics["best/val/acc"] == pytest.approx(best.value)
    plots = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optuna_history.png", "plots/optuna_parallel_coordinate.png"} <= plots
    assert len(list((tmp_path / "search").glob("[0-9]_*"))) == len(trained) + 1


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


def test_runs_command_compares_diffs_filters_and_plots(tracking_uri, mlflow_client, tmp_path,
                                                       capsys, monkeypatch):
    from PIL import Image

    from trainlab.compare import runs_cli

    monkeypatch.setenv("COLUMNS", "80")
    experiment = mlflow_client.create_experiment("cmp")
    parent = mlflow_client.create_run(experiment, run_name="sweep",
                                      tags={"trainlab.role": "sweep"}).info.run_id
    curves = {"lr=0.1,seed=1": [0.5, 0.9, 0.8], "lr=0.1,seed=2": [0.6, 0.7, 0.7],
              "lr=1,seed=1": [0.2, 0.3, 0.4]}
    ids = {}
    for name, values in curves.items():
        overrides = name.replace(",", " ") + " model=mlp trainer.max_epochs=3 " + "x=y " * 20
        run = mlflow_client.create_run(experiment, run_name=name, tags={
            "mlflow.parentRunId": parent, "trainlab.overrides": overrides}).info.run_id
        ids[name] = run
        mlflow_client.log_param(run, "lr", name.split(",")[0][3:])
        mlflow_client.log_param(run, "model", "mlp")
        for epoch, value in enumerate(values):
            mlflow_client.log_metric(run, "val/acc", value, step=10 * (epoch + 1))
            mlflow_client.log_metric(run, "epoch", epoch, step=10 * (epoch + 1))
        mlflow_client.set_terminated(run, "FINISHED")
    mlflow_client.log_text(ids["lr=1,seed=1"], "optimizer:\n  lr: 1\n  momentum: 0.9\n",
                           "config.yaml")
    mlflow_client.log_text(ids["lr=0.1,seed=1"], "optimizer:\n  lr: 0.1\n  momentum: 0.9\n",
                           "config.yaml")
    mlflow_client.create_run(experiment, run_name="outside the sweep")
    cli = ["--tracking-uri", tracking_uri, "--experiment", "cmp"]

    png = tmp_path / "curves.png"
    assert runs_cli([*cli, "--sweep", parent[:6], "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()[2:]
    assert lines[0].split() == ["id", "run", "status", "best", "last", "duration"], \
        "too narrow for the overrides column: the run names show them"
    assert max(map(len, lines[:6])) <= 80, "the table fits the terminal"
    assert [line.split()[:2] for line in lines[2:5]] == [
        [ids["lr=0.1,seed=1"][:8], "lr=0.1,seed=1"], [ids["lr=0.1,seed=2"][:8], "lr=0.1,seed=2"],
        [ids["lr=1,seed=1"][:8], "lr=1,seed=1"]]
    assert "0.9000" in lines[2] and "0.8000" in lines[2], "best and last value"
    assert "lr=0.1" in lines[5] and "0.8000 ± 0.1414" in lines[5]
    assert "outside the sweep" not in out
    with Image.open(png) as image:
        assert image.width > 1000

    assert runs_cli([*cli, "--filter", "params.lr = '0.1'"]) == 0
    out = capsys.readouterr().out
    assert "lr=0.1,seed=2" in out and "lr=1,seed=1" not in out

    assert runs_cli([*cli, "--diff", ids["lr=0.1,seed=1"][:7], ids["lr=1,seed=1"][:7]]) == 0
    out = capsys.readouterr().out
    assert "lr  0.1  →  1" in out and "optimizer.lr  0.1  →  1" in out
    assert "model" not in out and "momentum" not in out, "only what differs"

    assert runs_cli([*cli, "--metric", "val/accuracy"]) == 1
    assert "no run has this metric; they have epoch, val/acc" in capsys.readouterr().err
    assert runs_cli([*cli, "--filter", "params.lr = = 1"]) == 1
    assert "--filter" in capsys.readouterr().err
    assert runs_cli([*cli, "--sweep", "zzzz"]) == 1
    assert "no run of this experiment has an id starting with 'zzzz'" in capsys.readouterr().err
    assert runs_cli(["--tracking-uri", tracking_uri, "--experiment", "nope"]) == 1
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_ui_answers_before_it_prints_refuses_a_busy_port_and_stops_all_it_started(
        tmp_path, tracking_uri, mlflow_client):
    import psutil

    experiment = mlflow_client.create_experiment("trainlab")
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.Popen([str(TRAINLAB), "ui", "--port", str(port)], cwd=tmp_path, text=True,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs?workflowType=machine_learning"
        assert line.strip().endswith(url), line
        with urllib.request.urlopen(url, timeout=10) as page:  # answers at once
            assert page.status == 200
        api = (f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get"
               f"?experiment_id={experiment}")
        with urllib.request.urlopen(api, timeout=10) as answer:
            assert b'"name": "trainlab"' in answer.read().replace(b'":"', b'": "')

        busy = subprocess.run([str(TRAINLAB), "ui", "--port", str(port)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=60)
        assert busy.returncode == 1 and busy.stdout == ""
        assert f"--port {port}: 127.0.0.1:{port} is in use" in busy.stderr

        started = psutil.Process(proc.pid).children(recursive=True)
        assert started, "the server runs in child processes"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    time.sleep(0.5)
    left = [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], "every process the UI started is stopped"


ONE_EPOCH = ["model=mlp", "trainer.max_epochs=1", "trainer.progress_bar=false",
             "logger.log_model=none"]


def test_a_sweep_resumes_only_under_its_own_command_and_reproduce_starts_a_new_one(
        trainlab_in_process, mlflow_client, tmp_path):
    grid = ["train", "-m", "hydra.sweep.dir=grid", "optimizer.lr=1e-3,1e-2"]
    trainlab_in_process(*grid, *ONE_EPOCH)
    parent, children = split_sweep(runs_of(mlflow_client))

    # another grid in the same sweep dir: refused before anything runs, naming the change
    other = trainlab_in_process(*grid, *ONE_EPOCH, "trainer.max_epochs=2", check=False)
    assert other.returncode == 1
    (line,) = other.stderr.splitlines()
    assert line.startswith(f"error: hydra.sweep.dir=grid holds the sweep 'optimizer.lr, 2 jobs'"
                           f" (MLflow run {parent.info.run_id[:8]}) of other overrides "
                           "(before: (none); now: trainer.max_epochs=2)"), line
    assert "a new hydra.sweep.dir" in line
    assert len(runs_of(mlflow_client)) == 3
    assert mlflow_client.get_run(parent.info.run_id).info.status == "FINISHED"

    # reproduce --run of the parent repeats every job in a new sweep, the old one untouched
    again = trainlab_in_process("reproduce", parent.info.run_id[:8], "--run")
    assert f"every job runs again, run {parent.info.run_id[:8]} is left as it is" in again.stdout
    assert "finished in an earlier attempt" not in again.stdout + again.stderr
    parents = [r for r in runs_of(mlflow_client) if r.data.tags.get("trainlab.role") == "sweep"]
    assert len(parents) == 2
    for sweep in parents:
        jobs = mlflow_client.search_runs(
            [sweep.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
        assert sorted(r.info.status for r in jobs) == ["FINISHED", "FINISHED"]
    new_dir = Path(parents[1].data.tags["trainlab.sweep_dir"])
    assert new_dir.parent == tmp_path / "outputs" / "multiruns"
    assert new_dir.name.startswith("reproduce-")


def test_an_optuna_study_resumes_only_under_its_own_command(trainlab_in_process,
                                                             mlflow_client, tmp_path):
    import optuna

    search = ["train", "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=random",
              "hydra.sweep.dir=search", "hydra.sweeper.n_trials=1",
              "optimizer.lr=choice(0.01,0.02)"]
    trainlab_in_process(*search, *ONE_EPOCH)
    (parent,) = runs_of(mlflow_client)[:1]

    # the same study with more epochs: the sweep's parent run refuses it ...
    other = trainlab_in_process(*search, *ONE_EPOCH, "trainer.max_epochs=2", check=False)
    assert other.returncode == 1
    assert "(before: (none); now: trainer.max_epochs=2)" in other.stderr
    assert "a new hydra.sweeper.study_name" in other.stderr
    # ... and so does the study itself, tracked or not
    untracked = trainlab_in_process(*search, "model=cnn", *ONE_EPOCH[1:3], "logger=none",
                                    check=False)
    assert untracked.returncode == 1
    (line,) = [x for x in untracked.stderr.splitlines() if "error" in x]
    assert line.startswith("error: study train was run with other overrides (before: "
                           "model=mlp logger.log_model=none; now: model=cnn logger=none)"), line
    study = optuna.load_study(study_name="train", storage=f"sqlite:///{tmp_path}/search/optuna.db")
    assert len(study.trials) == 1
    # another seed is the same study (each process sharing one may seed its sampler)
    trainlab_in_process(*search, *ONE_EPOCH, "seed=7")

    # reproduce runs a new study: every trial again
    trainlab_in_process("reproduce", parent.info.run_id[:8], "--run")
    (new,) = [r for r in runs_of(mlflow_client) if r.data.tags.get("trainlab.role") == "sweep"
              and r.info.run_id != parent.info.run_id]
    assert new.data.tags["trainlab.study"].startswith("train-reproduce-")
    assert new.data.tags["best.optimizer.lr"] in ("0.01", "0.02")


def test_a_grid_with_a_misspelt_option_or_an_unfitting_loss_is_refused_before_any_job(
        trainlab_in_process, mlflow_client, tmp_path):
    refused = trainlab_in_process("train", "-m", "model=mlp,nosuch", "loss=ce,dice",
                                  *ONE_EPOCH[1:], check=False)
    assert refused.returncode == 1
    assert sorted(refused.stderr.splitlines()) == [
        "error: model=nosuch: no model/nosuch.yaml on the config search path; model "
        "options: cnn, mlp, timm, torchvision, unet (2 of 4 jobs; none was run)",
        "error: loss=dice does not fit data.task=classification with 10 classes "
        "(classification); losses that fit: ce, nll, focal, bce_logits, bce, l1, mse, "
        "smooth_l1, huber, kl_div (1 of 4 jobs; none was run)"][::-1]
    unknown = trainlab_in_process("train", "-m", "nosuch=1,2", *ONE_EPOCH, check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.splitlines()[0] == ("error: Could not override 'nosuch'. To append "
                                              "to your config use +nosuch=1 (1 of 2 jobs; "
                                              "none was run)")
    assert not (tmp_path / "outputs").exists()
    assert mlflow_client.search_runs([e.experiment_id for e in
                                      mlflow_client.search_experiments()]) == []


def test_a_job_failing_before_its_run_opens_is_counted_and_listed(trainlab_in_process,
                                                                  mlflow_client):
    # classes inferred from the data: the loss misfit shows only when the job builds it
    sweep = trainlab_in_process("train", "-m", "hydra.sweep.dir=grid", "loss=ce,dice",
                                "data.num_classes=null", *ONE_EPOCH, check=False)
    assert sweep.returncode == 1
    misfit = "loss=dice does not fit data.task=classification with 10 classes"
    assert sweep.stderr.count(misfit) == 1, sweep.stderr
    assert "Sweep summary (2 jobs" in sweep.stdout
    assert "overrides of every job: data.num_classes=null model=mlp" in sweep.stdout
    assert "loss=dice: FAILED loss=dice does not fit" in sweep.stdout
    parent, children = split_sweep(runs_of(mlflow_client))
    failed = [r for r in children if r.info.status == "FAILED"]
    assert [r.info.run_name for r in failed] == ["loss=dice"]
    assert failed[0].data.tags["trainlab.error"].startswith(misfit)
    summary = mlflow_client.download_artifacts(parent.info.run_id, "summary.csv",
                                               parent.data.tags["trainlab.sweep_dir"])
    assert [row["status"] for row in csv.DictReader(open(summary))] == ["FINISHED", "FAILED"]


def test_runs_plot_draws_each_jobs_latest_attempt_and_diff_refuses_a_parent(mlflow_client, tmp_path,
                                                  trainlab_in_process):
    from trainlab.compare import plot_curves, select_runs

    experiment = mlflow_client.create_experiment("cmp")
    parent = mlflow_client.create_run(experiment, run_name="sweep",
                                      tags={"trainlab.role": "sweep"}).info.run_id
    # seed 1 was killed after its first epoch and rerun to its end
    for seed, values, status in ((1, [0.1], "KILLED"), (1, [0.5, 0.6, 0.7], "FINISHED"),
                                 (2, [0.4, 0.5, 0.6], "FINISHED")):
        run = mlflow_client.create_run(experiment, run_name=f"lr=0.1,seed={seed}", tags={
            "mlflow.parentRunId": parent, "trainlab.overrides": f"lr=0.1 seed={seed}"})
        for epoch, value in enumerate(values):
            mlflow_client.log_metric(run.info.run_id, "val/acc", value, step=epoch + 1)
            mlflow_client.log_metric(run.info.run_id, "epoch", epoch, step=epoch + 1)
        mlflow_client.set_terminated(run.info.run_id, status)
    runs = select_runs(mlflow_client, experiment, parent[:8])
    assert len(runs) == 3
    assert plot_curves(mlflow_client, runs, "val/acc", str(tmp_path / "curves.png")) == [
        "lr=0.1 (mean of 2 seeds)"]

    # a sweep's parent has no config to diff: one line says so
    diff = trainlab_in_process("runs", "--experiment", "cmp", "--diff", parent[:8],
                               runs[0].info.run_id[:8], check=False)
    assert diff.returncode == 1 and diff.stdout == ""
    assert diff.stderr == (f"error: --diff: run {parent[:8]} is the parent of the sweep 'sweep' "
                           "and trained nothing itself; `trainlab runs --sweep "
                           f"{parent[:8]}` lists its jobs; a sweep's parent has no config of "
                           "its own to compare\n")


def test_runs_and_ui_refuse_bad_options_in_one_line_before_doing_anything(
        trainlab_in_process, mlflow_client, tmp_path):
    mlflow_client.create_experiment("trainlab")
    for args, error in [
        (["runs", "--plot", "curves.xyz"], "error: --plot curves.xyz: matplotlib cannot write "
                                           ".xyz files; end the name with one of "),
        (["runs", "--plot", "curves"], "error: --plot curves: no file type; end the name "
                                       "with one of "),
        (["ui", "--port", "99999"], "error: --port 99999: not a port; choose one from 1 to "
                                    "65535"),
        (["ui", "--port", "-1"], "error: --port -1: not a port; choose one from 1 to 65535"),
        (["ui", "--experiment", "nosuch"], "error: no MLflow experiment 'nosuch' in the store; "
                                           "choose one with --experiment: Default, trainlab"),
        (["ui", "--tracking-uri", f"sqlite:///{tmp_path}/missing.db"],
         f"error: no MLflow store at sqlite:///{tmp_path}/missing.db: nothing was tracked"),
    ]:
        refused = trainlab_in_process(*args, check=False)
        assert refused.returncode == 1 and refused.stdout == "", args
        (line,) = refused.stderr.splitlines()
        assert line.startswith(error), line
        assert ".png" in line or "--plot" not in line
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.slow
def test_an_interrupted_sweep_job_says_to_rerun_the_sweep(run_trainlab, mlflow_client):
    sweep = ["train", "-m", "hydra.sweep.dir=grid", "optimizer.lr=1e-3", *QUICK,
             "logger.log_model=none", "trainer.callbacks=[{_target_:ctrl_c_once.CtrlCOnce,"
             "marker:ctrl_c_pressed,below_lr:0.01}]"]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS),
                                                       os.environ.get("PYTHONPATH")]))}
    proc = run_trainlab(*sweep, env=env, check=False)
    assert proc.returncode == 130
    out = proc.stdout + proc.stderr
    assert "interrupted at epoch 1" in out and "trainer.resume=" not in out
    assert "rerun the sweep's command: it runs the jobs not finished again" in out
    run_trainlab(*sweep, env=env)
    parent, children = split_sweep(runs_of(mlflow_client))
    assert [r.info.status for r in children] == ["KILLED", "FINISHED"]
    assert parent.info.status == "FINISHED"
