"""Keep-top-k checkpoints through the real loop: exactly the k best epochs by
``trainer.monitor`` (as MLflow recorded it) stay on disk, a resume continues the ranking,
and the epoch files are paths a Hydra override takes."""

from __future__ import annotations

import pytest
import torch

from conftest import FAST, runs_of

RUN = [*FAST, "model.hidden=[16]", "optimizer.lr=3e-3", "trainer.save_top_k=2",
       "logger.log_checkpoints=true"]


def best_epochs(client, run_id: str, monitor: str, mode: str, k: int) -> list[int]:
    """The k best epochs (counted from 1) by ``monitor`` as MLflow holds it; ties go to the
    older epoch."""
    epoch_at = {m.step: int(m.value) for m in client.get_metric_history(run_id, "epoch")}
    scored = [(m.value if mode == "min" else -m.value, epoch_at[m.step])
              for m in client.get_metric_history(run_id, monitor)]
    assert len(scored) == len(epoch_at)
    return sorted(epoch + 1 for _, epoch in sorted(scored)[:k])


def kept_epochs(folder) -> list[int]:
    return sorted(int(path.name[len("epoch_"):][:3]) for path in folder.glob("epoch_*.pt"))


@pytest.mark.parametrize("monitor, mode", [("val/loss", "min"), ("val/acc", "max")])
def test_the_k_best_epochs_stay_and_a_resume_continues_the_ranking(
    trainlab_in_process, mlflow_client, tmp_path, monitor, mode
):
    settings = [*RUN, f"trainer.monitor={monitor}", f"trainer.monitor_mode={mode}"]
    trainlab_in_process("train", *settings, "trainer.max_epochs=3", "hydra.run.dir=run")
    folder = tmp_path / "run" / "checkpoints"
    (run,) = runs_of(mlflow_client)
    assert kept_epochs(folder) == best_epochs(mlflow_client, run.info.run_id, monitor, mode, 2)
    for path in folder.glob("epoch_*.pt"):  # each file is its epoch, named by its value
        state = torch.load(path, weights_only=True)
        assert path.name == (f"epoch_{state['epoch'] + 1:03d}-{monitor.replace('/', '_')}_"
                             f"{state['metrics'][monitor]:.4f}.pt")
    stray = folder / "epoch_005-cut_short.pt"  # what a kill after an epoch file can leave
    stray.write_bytes(b"")

    # one more epoch: k files again only if the ranking went on from the checkpoint's
    trainlab_in_process("train", *settings, "trainer.max_epochs=4", "trainer.resume=last",
                        "hydra.run.dir=run")
    (run,) = runs_of(mlflow_client)
    assert len(mlflow_client.get_metric_history(run.info.run_id, "epoch")) == 4
    assert kept_epochs(folder) == best_epochs(mlflow_client, run.info.run_id, monitor, mode, 2)
    assert not stray.exists()
    logged = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "checkpoints")}
    assert logged == {"checkpoints/best.pt", "checkpoints/last.pt",
                      "checkpoints/class_names.json"}  # the epoch files stay on disk only

    first = min(folder.glob("epoch_*.pt"))  # a kept epoch, given as an override's value
    trainlab_in_process("train", *settings, "trainer.max_epochs=5", f"trainer.resume={first}",
                        "trainer.resume_as=new_run", "hydra.run.dir=branch")
    branch = runs_of(mlflow_client)[-1]
    assert branch.data.tags["trainlab.origin_run_id"] == run.info.run_id
    assert len(list((tmp_path / "branch" / "checkpoints").glob("epoch_*.pt"))) == 2
