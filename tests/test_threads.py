"""Loader workers and torch's CPU pool share the cores instead of oversubscribing them."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset, TensorDataset

from trainlab.data.datasets import DataSplits
from trainlab.data.loaders import build_loaders
from trainlab.threads import set_training_threads, training_threads, usable_cores


class ThreadCounts(Dataset):
    """Each sample reports the torch and OpenCV threads of the process that loads it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        import cv2

        return torch.tensor([torch.get_num_threads(), cv2.getNumThreads()]), torch.tensor(0)


def test_loader_workers_run_one_torch_and_one_opencv_thread():
    import cv2  # loaded by imgaug in a run with augmentation

    data = OmegaConf.create({"batch_size": 2, "num_workers": 1})
    splits = DataSplits(ThreadCounts(), TensorDataset(torch.zeros(2, 1), torch.zeros(2)))
    previous = cv2.getNumThreads()
    try:
        train, _ = build_loaders(splits, data, 0, torch.device("cpu"))
        (counts, _), = list(train)
    finally:
        cv2.setNumThreads(previous)
    assert counts.tolist() == [[1, 1], [1, 1]]


@pytest.mark.parametrize("workers, processes", [(0, 1), (2, 1), (1, 2), (64, 1)])
def test_torch_gets_the_cores_the_workers_leave(monkeypatch, workers, processes):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    previous = torch.get_num_threads()
    try:
        set_training_threads(torch.device("cpu"), workers, processes)
        assert torch.get_num_threads() == max(1, usable_cores() // processes - workers)
    finally:
        torch.set_num_threads(previous)


def test_omp_num_threads_set_by_the_user_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert training_threads(num_workers=2) == 3
