"""trainlab as a user gets it: a wheel built from this repository, installed (not editable)
into a fresh virtualenv, used from a project `trainlab init` wrote, far from the clone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, runs_of

pytestmark = pytest.mark.slow

SHIPPED = ["pyproject.toml", "README.md", "conf", "experiments", "src"]


def build_wheel(into: Path) -> Path:
    """Build from a copy of the shipped files, so the clone gets no build/ or egg-info."""
    source = into / "source"
    source.mkdir(parents=True)
    for name in SHIPPED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(into), str(source)], check=True, capture_output=True)
    (wheel,) = into.glob("trainlab-*.whl")
    return wheel


def fresh_venv(folder: Path, wheel: Path) -> Path:
    """A virtualenv with only the wheel installed; the dependencies come from this test's
    environment through a .pth line (its own .pth files, such as an editable trainlab,
    are not read from there)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                           "'purelib'))"], capture_output=True, text=True, check=True)
    Path(site.stdout.strip(), "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    return folder / "bin"


def test_the_wheel_carries_configs_and_trains_a_new_project_from_anywhere(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        symlinks = [i.filename for i in archive.infolist() if (i.external_attr >> 28) == 0o12]
    assert not symlinks
    shipped_yaml = {f"trainlab/{p.relative_to(REPO).as_posix()}"
                    for folder in ("conf", "experiments") for p in (REPO / folder).rglob("*.yaml")}
    assert shipped_yaml <= names
    modules = {p.relative_to(REPO / "src").as_posix() for p in (REPO / "src").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"

    bin_dir = fresh_venv(tmp_path / "venv", wheel)
    env = {key: value for key, value in os.environ.items() if key not in (
        "PYTHONPATH", "TRAINLAB_CONFIG_DIR", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"

    def trainlab(*args: str, cwd: Path) -> str:
        proc = subprocess.run(["trainlab", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, (
            f"trainlab {args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc.stdout

    where = subprocess.run([str(bin_dir / "python"), "-c",
                            "import trainlab; print(trainlab.__file__)"],
                           env=env, capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(tmp_path / "venv")

    trainlab("init", "catalog", cwd=tmp_path)
    project = tmp_path / "catalog"
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m",
                    "start"], cwd=project, check=True)

    trainlab("train", "experiment=stripes", "trainer.max_epochs=1", "trainer.progress_bar=false",
             "logger.system_metrics_every_s=1", cwd=project)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = runs_of(client, "catalog")
    assert run.info.status == "FINISHED"
    logged = client.download_artifacts(run.info.run_id, "config.yaml", str(project))
    config = yaml.safe_load(Path(logged).read_text())  # structural keys are not params
    assert config["model"]["_target_"] == "catalog.models.TinyCNN"
    assert config["loss"]["_target_"] == "catalog.losses.FocalCE"
    assert config["data"]["dataset"]["_target_"] == "catalog.data.load_stripes"
    tags = run.data.tags
    assert tags["trainlab.git.dirty"] == "false" and len(tags["mlflow.source.git.commit"]) == 40
    assert tags["trainlab.env.trainlab"] == "0.1.0" and tags["trainlab.env.gpu"] == "none"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"environment", "config.yaml", "checkpoints", "preview"} <= artifacts
    assert "git" not in artifacts  # a clean tree: no diff
    packages = Path(client.download_artifacts(run.info.run_id, "environment/requirements.txt"))
    assert "trainlab==0.1.0" in packages.read_text().splitlines()
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert {d.name for d in inputs.values()} == {"stripes"}
    assert '"num_rows": 480' in inputs["train"].profile
    assert '"num_rows": 120' in inputs["val"].profile
    assert any(name.startswith("system/") for name in run.data.metrics)

    assert "wrote" in trainlab("preview", "experiment=stripes", "augment=light", cwd=project)
    assert (project / "preview.png").stat().st_size > 1000
    trainlab("lr-plot", "experiment=stripes", "+out=lr.png", cwd=project)
    assert (project / "lr.png").stat().st_size > 1000
    report = trainlab("eval", f"run_id={run.info.run_id}", cwd=project)
    assert "val/acc = " in report
