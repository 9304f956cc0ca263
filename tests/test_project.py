"""trainlab used from a user's own project: ./conf (or --config-dir, or TRAINLAB_CONFIG_DIR)
beside the shipped configs for every command, `trainlab init`, debug presets, and runs that
record what it takes to repeat them (`trainlab reproduce`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import load_model_elsewhere, runs_of

GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def job_config(proc) -> dict:
    return yaml.safe_load(proc.stdout)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project in the working directory: a loss of its own code, an override of a
    shipped option, an experiment in conf/experiment and one in experiments/."""
    write(tmp_path / "mycode" / "__init__.py", "")
    write(tmp_path / "mycode" / "losses.py",
          "import torch.nn.functional as F\n\n\n"
          "def soft_ce(logits, targets, smoothing=0.1):\n"
          "    return F.cross_entropy(logits, targets, label_smoothing=smoothing)\n")
    write(tmp_path / "conf" / "loss" / "soft_ce.yaml",
          "_target_: mycode.losses.soft_ce\n_partial_: true\nsmoothing: 0.2\n")
    write(tmp_path / "conf" / "optimizer" / "adam.yaml",  # replaces the shipped adam
          "_target_: torch.optim.Adam\n_partial_: true\nlr: 0.0042\n")
    write(tmp_path / "conf" / "experiment" / "mine.yaml",
          "# @package _global_\ndefaults:\n  - override /loss: soft_ce\n  - override /model: mlp\n"
          "seed: 7\n")
    write(tmp_path / "experiments" / "beside.yaml", "# @package _global_\nseed: 8\n")
    return tmp_path


@pytest.mark.parametrize("command", ["train", "preview", "lr-plot"])
def test_every_command_sees_the_projects_configs_and_experiments(run_trainlab, project, command):
    cfg = job_config(run_trainlab(command, "--cfg", "job", "experiment=mine"))
    assert cfg["loss"]["_target_"] == "mycode.losses.soft_ce"
    assert cfg["optimizer"]["lr"] == 0.0042  # the project's adam.yaml wins over the shipped one
    assert cfg["seed"] == 7


def test_experiments_beside_conf_and_shipped_presets_stay_available(run_trainlab, project):
    assert job_config(run_trainlab("train", "--cfg", "job", "experiment=beside"))["seed"] == 8
    shipped = job_config(run_trainlab("train", "--cfg", "job", "experiment=digits_cnn"))
    assert shipped["logger"]["experiment_name"] == "digits_cnn"


def test_help_lists_the_projects_options_beside_the_shipped_ones(run_trainlab, project):
    text = run_trainlab("train", "--help").stdout
    experiments = next(line for line in text.splitlines() if line.startswith("experiment:"))
    assert {"mine", "beside", "digits_cnn"} <= {x.strip() for x in
                                                experiments.split(":")[1].split(",")}
    assert "soft_ce" in next(line for line in text.splitlines() if line.startswith("loss:"))


@pytest.mark.parametrize("how", ["--config-dir", "TRAINLAB_CONFIG_DIR"])
def test_a_config_folder_elsewhere_comes_before_the_shipped_and_local_ones(
        run_trainlab, project, tmp_path, how):
    other = write(tmp_path / "team" / "conf" / "optimizer" / "adam.yaml",
                  "_target_: torch.optim.Adam\n_partial_: true\nlr: 0.0777\n").parents[1]
    if how == "--config-dir":
        proc = run_trainlab("train", "--config-dir", str(other), "--cfg", "job")
    else:
        proc = run_trainlab("train", "--cfg", "job", env={"TRAINLAB_CONFIG_DIR": str(other)})
    assert job_config(proc)["optimizer"]["lr"] == 0.0777


def test_a_missing_config_folder_is_a_one_line_error(run_trainlab):
    proc = run_trainlab("train", "--config-dir", "nowhere", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --config-dir 'nowhere': no such folder"


def test_the_projects_own_loss_trains_from_its_folder(run_trainlab, project, mlflow_client):
    """No PYTHONPATH, no --config-dir: ./conf and the code beside it are found."""
    run_trainlab("train", "experiment=mine", "debug=fast", "trainer.progress_bar=false")
    (run,) = runs_of(mlflow_client, "debug")
    assert run.info.status == "FINISHED"
    assert run.data.params["loss"] == "soft_ce"
    logged = mlflow_client.download_artifacts(run.info.run_id, "config.yaml", str(project))
    assert yaml.safe_load(Path(logged).read_text())["loss"]["_target_"] == "mycode.losses.soft_ce"


# ------------------------------------------------------------------------- debug
def test_debug_fast_runs_two_batches_and_logs_no_model(run_trainlab, mlflow_client):
    run_trainlab("train", "debug=fast", "model=mlp", "trainer.progress_bar=false")
    (run,) = runs_of(mlflow_client, "debug")
    assert run.data.metrics["epoch"] == 0
    steps = [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "val/acc")]
    assert steps == [2]  # one epoch of two training batches
    assert not [a for a in mlflow_client.list_artifacts(run.info.run_id) if a.path == "model"]


@pytest.mark.parametrize("preset", ["fast", "overfit", "profile"])
def test_debug_presets_pass_the_check_without_tracking(compose, preset):
    """``logger=none`` takes the store settings a preset makes (experiment name, models)."""
    from trainlab.config_check import check_config

    check_config(compose(f"debug={preset}", "logger=none", "model=mlp"), {"logger": "none"})


def test_debug_profile_logs_a_trace_and_the_slowest_ops(run_trainlab, mlflow_client):
    run_trainlab("train", "debug=profile", "model=mlp", "trainer.progress_bar=false")
    (run,) = runs_of(mlflow_client, "debug")
    logged = {Path(a.path).name for a in mlflow_client.list_artifacts(run.info.run_id, "profile")}
    assert logged == {"trace.json", "ops.txt"}
    ops = Path(mlflow_client.download_artifacts(run.info.run_id, "profile/ops.txt")).read_text()
    assert "aten::" in ops and "Self CPU" in ops


@pytest.mark.slow
def test_debug_overfit_drives_the_loss_to_about_zero(run_trainlab, mlflow_client):
    run_trainlab("train", "debug=overfit", "model=mlp", "trainer.progress_bar=false")
    (run,) = runs_of(mlflow_client, "debug")
    assert run.data.metrics["val/loss"] < 0.05
    assert run.data.metrics["val/acc"] == 1.0


# -------------------------------------------------------------------- provenance
def git_project(folder: Path) -> None:
    write(folder / ".gitignore", "outputs/\nmlflow.db*\nmlruns/\n__pycache__/\n")
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    subprocess.run(["git", "add", "-A"], cwd=folder, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "start"], cwd=folder, check=True)


def assert_reproducible(client, run, dirty: bool) -> None:
    """What `trainlab reproduce` needs is in the run, read back from the store."""
    from importlib.metadata import version

    import torch

    tags = run.data.tags
    assert tags["trainlab.env.torch"] == torch.__version__
    assert {"trainlab.env.python", "trainlab.env.cuda", "trainlab.env.cudnn",
            "trainlab.env.cpu", "trainlab.env.gpu"} <= set(tags)
    assert len(tags["mlflow.source.git.commit"]) == 40
    assert tags["trainlab.git.dirty"] == str(dirty).lower()
    packages = Path(client.download_artifacts(run.info.run_id, "environment/requirements.txt"))
    assert f"torch=={version('torch')}" in packages.read_text().splitlines()
    git_files = [a.path for a in client.list_artifacts(run.info.run_id, "git")]
    assert git_files == (["git/uncommitted.diff"] if dirty else [])
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val"}
    assert inputs["train"].name == "digits" and inputs["train"].digest != inputs["val"].digest
    assert '"num_rows": 1438' in inputs["train"].profile
    assert any(name.startswith("system/cpu_utilization") for name in run.data.metrics)


def test_runs_record_environment_git_state_data_and_system_metrics(
        run_trainlab, mlflow_client, project):
    git_project(project)
    args = ["experiment=mine", "debug=fast", "trainer.progress_bar=false",
            "logger.system_metrics_every_s=0.5"]
    run_trainlab("train", *args)
    write(project / "mycode" / "losses.py", "# changed after the commit\n"
          + (project / "mycode" / "losses.py").read_text())
    run_trainlab("train", *args)
    clean, dirty = runs_of(mlflow_client, "debug")
    assert_reproducible(mlflow_client, clean, dirty=False)
    assert_reproducible(mlflow_client, dirty, dirty=True)
    diff = Path(mlflow_client.download_artifacts(dirty.info.run_id, "git/uncommitted.diff"))
    assert "+# changed after the commit" in diff.read_text()

    # months later: the experiment's config changed; reproduce pins the old value and says
    # which code to check out, then repeats the run
    write(project / "conf" / "experiment" / "mine.yaml",
          (project / "conf" / "experiment" / "mine.yaml").read_text().replace("seed: 7", "seed: 9"))
    scratch = project / "scratch"
    scratch.mkdir()
    report = run_trainlab("reproduce", dirty.info.run_id[:8],  # as `trainlab runs` shows
                          env={"TMPDIR": str(scratch)}).stdout
    assert f"git checkout {dirty.data.tags['mlflow.source.git.commit']}" in report
    kept_diff = report.split("git apply ")[1].split()[0]
    assert Path(kept_diff).read_text() == diff.read_text()  # kept: the report points to it
    # a clean run's report points to no file: nothing is left in the temp dir
    run_trainlab("reproduce", clean.info.run_id[:8], env={"TMPDIR": str(scratch)})
    left = {p.relative_to(scratch).parts[0] for p in scratch.iterdir()}
    assert left == {Path(kept_diff).relative_to(scratch).parts[0]}
    assert "seed=7" in report.splitlines()[-1]  # the command line
    run_trainlab("reproduce", dirty.info.run_id, "--run")
    repeated = runs_of(mlflow_client, "debug")[-1]
    assert repeated.data.params["seed"] == "7"
    assert repeated.data.params == dirty.data.params


def test_reproduce_names_an_unknown_run(run_trainlab, mlflow_client, tracking_uri):
    proc = run_trainlab("reproduce", "0123456789abcdef", check=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f"error: no run of the store {tracking_uri} has an id starting with '0123456789abcdef'")


def test_reproduce_elsewhere_uses_or_names_the_config_folder_the_run_read(
        run_trainlab, project, mlflow_client, tmp_path):
    elsewhere, conf = tmp_path / "elsewhere", project / "conf"
    elsewhere.mkdir()
    run_trainlab("train", "--config-dir", str(conf), "experiment=mine", "debug=fast",
                 "trainer.progress_bar=false", "logger.log_system_metrics=false", cwd=elsewhere)
    (run,) = runs_of(mlflow_client, "debug")
    command = f"trainlab train --config-dir {conf} experiment=mine debug=fast"
    assert run.data.tags["trainlab.command"].startswith(command)
    report = run_trainlab("reproduce", run.info.run_id, cwd=elsewhere).stdout.splitlines()
    assert report[-2:] == ["config:   today's configs give the same values",
                           f"command:  {command} trainer.progress_bar=false "
                           "logger.log_system_metrics=false"]

    moved = conf.rename(project / "moved")  # the project's configs are somewhere else now
    proc = run_trainlab("reproduce", run.info.run_id, cwd=elsewhere, check=False)
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: experiment=mine: no experiment/mine.yaml on the config "
                           "search path; ")
    assert line.endswith(f"; the run read configs from {conf}; name that folder (or a copy of "
                         f"it) with `trainlab reproduce --config-dir DIR {run.info.run_id[:8]}`")
    report = run_trainlab("reproduce", "--config-dir", str(moved), run.info.run_id,
                          cwd=elsewhere).stdout
    assert f"command:  trainlab train --config-dir {moved} experiment=mine" in report


def test_runs_shows_the_projects_experiment_beside_the_debug_runs(trainlab_in_process,
                                                                  mlflow_client, tmp_path):
    fast = ["model=mlp", "debug=fast", "trainer.progress_bar=false",
            "logger.log_system_metrics=false"]
    trainlab_in_process("train", *fast)
    trainlab_in_process("train", *fast, "logger.experiment_name=mine")
    (mine,) = runs_of(mlflow_client, "mine")
    table = trainlab_in_process("runs").stdout.splitlines()
    assert table[0] == "experiment mine (the store's only one besides debug)"
    assert table[4].startswith(mine.info.run_id[:8])

    trainlab_in_process("train", *fast, "logger.experiment_name=other")
    write(tmp_path / "conf" / "local" / "default.yaml", "logger:\n  experiment_name: mine\n")
    table = trainlab_in_process("runs").stdout.splitlines()
    assert table[0] == "experiment mine (logger.experiment_name)"
    assert [line[:8] for line in table[4:]] == [mine.info.run_id[:8]]


# -------------------------------------------------------------------------- init
def test_init_names_the_package_after_the_folder_and_refuses_to_overwrite(run_trainlab, tmp_path):
    run_trainlab("init", "My-Cats")
    project = tmp_path / "My-Cats"
    assert (project / "my_cats" / "losses.py").is_file()
    assert "mlflow.db*" in (project / ".gitignore").read_text().splitlines()
    experiment = (project / "conf" / "experiment" / "stripes.yaml").read_text()
    assert "starter" not in experiment
    assert (project / "conf" / "model" / "tiny_cnn.yaml").read_text().count("my_cats.models") == 1
    again = run_trainlab("init", "My-Cats", check=False)
    assert again.returncode == 1 and "--force" in again.stderr


@pytest.mark.slow  # trains, evaluates and loads in four processes: about a minute
def test_a_starter_projects_model_loads_back_after_training(run_trainlab, mlflow_client,
                                                            tracking_uri, tmp_path):
    """Trained in an init'd folder, the model comes back through `trainlab eval` and through
    `mlflow.pytorch.load_model` there, and elsewhere: its code travels with it."""
    run_trainlab("init", "proj")
    project = tmp_path / "proj"
    run_trainlab("train", "experiment=stripes", "trainer.max_epochs=1",
                 "trainer.progress_bar=false", "logger.log_system_metrics=false", cwd=project)
    (run,) = runs_of(mlflow_client, "proj")
    assert run.info.status == "FINISHED"

    evaluated = run_trainlab("eval", f"run_id={run.info.run_id}", cwd=project).stdout
    assert f"val/acc = {run.data.metrics['val/acc']:.4f}" in evaluated
    unnamed = run_trainlab("eval", "run_id=", cwd=project, check=False)
    assert unnamed.returncode == 1 and unnamed.stderr.startswith("error: run_id=: no run id "
                                                                 "given; `trainlab runs` lists")
    # the project's runs are in its own experiment: `trainlab runs` there finds them
    table = run_trainlab("runs", cwd=project).stdout.splitlines()
    assert table[0] == "experiment proj (the store's only one)"
    assert any(line.startswith(run.info.run_id[:8]) for line in table[4:])

    best = Path(run.data.tags["trainlab.checkpoints"]) / "best.pt"
    loaded = ["proj.models", "TinyCNN", "True", "False"]
    assert load_model_elsewhere(tracking_uri, run.info.run_id, best, project) == loaded
    away = tmp_path / "away"
    away.mkdir()
    assert load_model_elsewhere(tracking_uri, run.info.run_id, best, away,
                                hidden=("trainlab", "proj")) == loaded
