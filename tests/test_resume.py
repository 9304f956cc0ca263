"""Resume as a record: refusals leave the old run exactly as it was, and a branch is a new
run tagged with its origin."""

from __future__ import annotations

import shutil

from conftest import runs_of

RUN = ["model=mlp", "model.hidden=[16]", "trainer.progress_bar=false", "logger.log_model=false",
       "logger.log_checkpoints=false", "trainer.deterministic=true"]


def snapshot(client, run_id):
    run = client.get_run(run_id)
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
               for key in run.data.metrics}
    return run.info.status, run.info.end_time, run.data.tags, history


def test_refused_resumes_leave_the_run_as_it_was_and_new_run_branches_off(
    run_trainlab, mlflow_client, tmp_path
):
    run_trainlab("train", *RUN, "trainer.max_epochs=2", "hydra.run.dir=first")
    ckpts = tmp_path / "first" / "checkpoints"
    shutil.copy(ckpts / "last.pt", tmp_path / "old.pt")
    run_trainlab("train", *RUN, "trainer.max_epochs=3", "trainer.resume=last",
                 "hydra.run.dir=first")
    (run,) = runs_of(mlflow_client)
    before = snapshot(mlflow_client, run.info.run_id)
    assert len(before[3]["val/acc"]) == 3 and before[0] == "FINISHED"

    behind = run_trainlab("train", *RUN, "trainer.max_epochs=5", "trainer.resume=old.pt",
                          check=False)
    assert behind.returncode == 1
    assert f"resume from the newer {ckpts / 'last.pt'}" in behind.stderr
    fewer = run_trainlab("train", *RUN, "trainer.max_epochs=2",
                         f"trainer.resume={ckpts / 'last.pt'}", check=False)
    assert fewer.returncode == 1
    assert "3 epoch(s) done; trainer.max_epochs=2 leaves nothing to train" in fewer.stderr
    assert "Traceback" not in behind.stderr + fewer.stderr
    assert snapshot(mlflow_client, run.info.run_id) == before
    assert len(runs_of(mlflow_client)) == 1

    run_trainlab("train", *RUN, "trainer.max_epochs=4", "trainer.resume=old.pt",
                 "trainer.resume_as=new_run", "hydra.run.dir=branch")
    original, branch = runs_of(mlflow_client)
    assert snapshot(mlflow_client, run.info.run_id) == before
    assert branch.data.tags["trainlab.origin_run_id"] == run.info.run_id
    assert branch.info.status == "FINISHED"
    assert [m.value for m in mlflow_client.get_metric_history(branch.info.run_id, "epoch")] == [
        2, 3]
    assert (tmp_path / "branch" / "checkpoints" / "best.pt").is_file()
