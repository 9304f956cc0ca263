"""DDP on CPU with gloo: two real processes, checked against one process on the same global
batch; device selection errors; the rank-sharded in-memory loader."""

from __future__ import annotations

import atexit
import os

import pytest
import torch

from conftest import FAST as BASE_FAST
from conftest import QUICK, free_port, runs_of
from trainlab.data.loaders import InMemoryLoader
from trainlab.distributed import Launch, plan_launch
from trainlab.errors import TrainlabError

FAST = [*BASE_FAST, "trainer.max_epochs=2", "model.hidden=[32]"]
NO_TRACKING = ["model=mlp", "trainer.progress_bar=false", "logger=none", "trainer.max_epochs=2",
               "model.hidden=[32]"]


class KeepFinalState:
    """Epoch-end callback: every rank saves its weights and metrics after the last epoch."""

    def __init__(self, path):
        self.path = path

    def on_epoch_end(self, runner, epoch, metrics):
        if epoch == runner.max_epochs - 1:
            torch.save({"model": runner.model.state_dict(), "metrics": metrics}, self.path)


def _fit_keeping_final_state(cfg, tracker, output_dir, choices, device=None, resume=None):
    """``train.fit`` as trainlab's DDP workers call it, each rank keeping its final state."""
    from trainlab.train import fit

    keep = KeepFinalState(output_dir / f"{torch.distributed.get_rank()}.pt")
    return fit(cfg, tracker, output_dir, choices, callbacks=[keep], device=device,
               resume=resume)


def test_two_gloo_ranks_stay_identical_and_match_one_process_on_the_global_batch(
    compose, tmp_path
):
    from trainlab.distributed import spawn_fit
    from trainlab.seeding import seed_everything
    from trainlab.tracker import NullTracker
    from trainlab.train import fit

    ranks = compose(*NO_TRACKING, "data.batch_size=32")
    spawn_fit(_fit_keeping_final_state, Launch("cpu", (0, 1), 2), ranks, tmp_path / "ddp", {},
              None, None)
    rank0, rank1 = (torch.load(tmp_path / f"ddp/{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0["model"][k], rank1["model"][k]) for k in rank0["model"])
    assert rank0["metrics"] == rank1["metrics"], "metrics are reduced across ranks"

    cfg = compose(*NO_TRACKING, "data.batch_size=64")
    seed_everything(int(cfg.seed))
    single = tmp_path / "single"
    fit(cfg, NullTracker.like(cfg.logger), single, {}, callbacks=[KeepFinalState(single / "0.pt")])
    one = torch.load(single / "0.pt", weights_only=True)
    for key, value in one["model"].items():
        assert torch.allclose(rank0["model"][key], value, atol=1e-5), key
    for name, value in one["metrics"].items():
        assert rank0["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def _work_then_abort_on_the_way_out(cfg, tracker, output_dir, choices, device=None,
                                    resume=None):
    """A rank whose work succeeds and whose interpreter then aborts as it exits, as a gloo
    group freed during shutdown can make it (rank 1)."""
    from types import SimpleNamespace

    if torch.distributed.get_rank() == 1:
        atexit.register(os.abort)
    return SimpleNamespace(best=0.75, best_epoch=2)


def _work_that_aborts(cfg, tracker, output_dir, choices, device=None, resume=None):
    if torch.distributed.get_rank() == 1:
        os.abort()
    return _work_then_abort_on_the_way_out(cfg, tracker, output_dir, choices)


@pytest.mark.parametrize("work, aborts_in", [(_work_then_abort_on_the_way_out, "teardown"),
                                             (_work_that_aborts, "work")])
def test_a_worker_that_aborts_fails_the_job_only_before_its_work_is_done(
    compose, tmp_path, capfd, work, aborts_in
):
    from omegaconf import OmegaConf

    from trainlab.distributed import spawn_fit

    cfg = compose("logger=none", "model=mlp")
    launch = Launch("cpu", (0, 1), 2)
    if aborts_in == "teardown":
        assert spawn_fit(work, launch, cfg, tmp_path, OmegaConf.create({}), None, None) == (
            0.75, 2)
        assert "warning: DDP worker rank 1 failed while leaving the process group, after the " \
               "job's work was done" in capfd.readouterr().err
    else:
        with pytest.raises(TrainlabError, match=r"^DDP worker rank 1 \(pid \d+\) was killed "
                                                r"by SIGABRT; the job stopped$"):
            spawn_fit(work, launch, cfg, tmp_path, OmegaConf.create({}), None, None)


def test_ranks_shard_the_same_order_into_the_global_batch():
    x = torch.arange(10.0)
    whole = [b[0] for b in InMemoryLoader((x,), batch_size=4, shuffle=True, seed=5)]
    shards = [
        [b[0] for b in InMemoryLoader((x,), 2, shuffle=True, seed=5, rank=r, world_size=2)]
        for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for i, batch in enumerate(whole):
        assert sorted(torch.cat([shards[0][i], shards[1][i]]).tolist()) == sorted(batch.tolist())
    val = [InMemoryLoader((torch.arange(5.0),), 2, shuffle=False, rank=r, world_size=2,
                          pad=False) for r in (0, 1)]
    assert sorted(torch.cat([b[0] for v in val for b in v]).tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("accelerator", "devices", "message"),
    [
        ("cpu", 0, "trainer.devices=0 is not valid for cpu"),
        ("cpu", [0, 2], r"list of GPU indices like \[0,2\] with accelerator=cuda"),
        ("cuda", 1, "no CUDA GPU is visible"),
        ("tpu", 1, "trainer.accelerator='tpu' is not known"),
    ],
)
def test_device_choices_that_cannot_work_are_clear_errors(accelerator, devices, message):
    with pytest.raises(TrainlabError, match=message):
        plan_launch(accelerator, devices)


def test_cpu_devices_count_processes(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert plan_launch("cpu", "auto").world_size == 1
    launch = plan_launch("cpu", 2)
    assert launch.world_size == 2 and launch.spawns
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    joined = plan_launch("cpu", "auto")
    assert joined.external and joined.world_size == 4 and not joined.spawns


@pytest.mark.slow
def test_trainlab_train_on_two_cpu_processes_makes_one_run_and_one_output_dir(
    run_trainlab, mlflow_client, tmp_path
):
    proc = run_trainlab("train", *QUICK, "logger.log_model=none", "trainer.accelerator=cpu",
                        "trainer.devices=2", "logger.log_checkpoints=true")
    assert proc.stdout.count("epoch   2/2") == 1, "only rank 0 prints"
    assert len(list((tmp_path / "outputs" / "runs").iterdir())) == 1
    (run,) = runs_of(mlflow_client)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.devices"] == "2"
    assert len(mlflow_client.get_metric_history(run.info.run_id, "val/acc")) == 2
    ckpts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "checkpoints")}
    assert ckpts == {"checkpoints/best.pt", "checkpoints/last.pt", "checkpoints/class_names.json"}


def _start_ddp(tmp_path, tracking_uri, *overrides):
    import subprocess

    from conftest import TRAINLAB

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [str(TRAINLAB), "train", *FAST, "trainer.max_epochs=300", "trainer.devices=2",
         *overrides], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def _wait_for_epoch(proc) -> list[str]:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "epoch   1/300" in line:
            return seen
    raise AssertionError("".join(seen)[-3000:])


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ddp_run_stopped_by_a_signal_ends_killed_with_exit_130_and_one_line(
    tmp_path, tracking_uri, mlflow_client, sig
):
    import signal

    proc = _start_ddp(tmp_path, tracking_uri)
    seen = _wait_for_epoch(proc)
    proc.send_signal(getattr(signal, sig))
    output = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    assert output.count("interrupted at epoch") == 1
    (run,) = runs_of(mlflow_client)
    assert run.info.status == "KILLED"
    assert list((tmp_path / "outputs" / "runs").glob("*/checkpoints/last.pt"))


@pytest.mark.slow
def test_a_killed_ddp_worker_is_named_with_its_rank_and_signal(
    tmp_path, tracking_uri, mlflow_client
):
    import signal

    import psutil

    proc = _start_ddp(tmp_path, tracking_uri)
    seen = _wait_for_epoch(proc)
    workers = [child for child in psutil.Process(proc.pid).children()
               if "resource_tracker" not in " ".join(child.cmdline())]
    rank1 = max(workers, key=lambda child: child.pid)  # started after rank 0
    os.kill(rank1.pid, signal.SIGKILL)
    output = "".join(seen) + proc.communicate(timeout=180)[0]
    assert proc.returncode == 1, output[-3000:]
    assert f"DDP worker rank 1 (pid {rank1.pid}) was killed by SIGKILL" in output, output[-3000:]
    assert "Traceback" not in output
    (run,) = runs_of(mlflow_client)
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_under_torchrun_only_rank_0_makes_an_output_dir(tmp_path, tracking_uri, mlflow_client):
    import subprocess

    from conftest import TRAINLAB

    torchrun = TRAINLAB.with_name("torchrun")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "trainlab.cli", "train", *FAST, "trainer.accelerator=cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "outputs" / "runs").iterdir())) == 1
    (run,) = runs_of(mlflow_client)
    assert run.info.status == "FINISHED"
