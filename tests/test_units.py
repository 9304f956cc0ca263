"""Pieces of the spine on their own: checkpoints, the in-memory loader, config flattening."""

from __future__ import annotations

import pytest
import torch

from trainlab.checkpoint import load_checkpoint, save_checkpoint
from trainlab.data.loaders import InMemoryLoader
from trainlab.errors import TrainlabError
from trainlab.tracking import flatten


def test_checkpoint_round_trip_leaves_no_temp_files(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "epoch": 2}
    path = save_checkpoint(state, tmp_path / "ckpt" / "last.pt")
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.arange(3.0))


def test_truncated_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    path = save_checkpoint({"w": torch.ones(1000)}, tmp_path / "last.pt")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TrainlabError, match=r"last\.pt is not a readable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(TrainlabError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": object()}, path)  # needs unpickling of arbitrary classes
    with pytest.raises(TrainlabError, match="evil.pt"):
        load_checkpoint(path)


def test_in_memory_loader_covers_every_sample_in_a_seeded_order():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    loader = InMemoryLoader((x, y), batch_size=4, shuffle=True, seed=3)
    first = torch.cat([b[1] for b in loader])
    assert len(loader) == 3 and sorted(first.tolist()) == list(range(10))
    assert torch.equal(first, torch.cat([b[1] for b in loader])), "same epoch, same order"
    loader.set_epoch(1)
    assert not torch.equal(first, torch.cat([b[1] for b in loader])), "epochs differ"
    for xb, yb in loader:
        assert torch.equal(xb.squeeze(1).long(), yb), "inputs and targets stay paired"


def test_in_memory_loader_drop_last():
    loader = InMemoryLoader((torch.zeros(10, 1),), batch_size=4, shuffle=False, drop_last=True)
    assert [len(b[0]) for b in loader] == [4, 4]


def test_flatten_nests_with_dots_and_keeps_lists():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": 1, "a.c": [1, 2], "d": {}}
