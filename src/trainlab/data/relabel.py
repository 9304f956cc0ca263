"""Another label set on the same images, e.g. digits as even/odd for a fine-tuning task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hydra.utils import get_method
from torch.utils.data import Dataset, TensorDataset

from trainlab.data.datasets import DataSplits
from trainlab.errors import TrainlabError


class Relabeled(Dataset):
    """``dataset`` with each target ``t`` replaced by ``mapping[t]``."""

    def __init__(self, dataset: Dataset, mapping: torch.Tensor) -> None:
        self.dataset, self.mapping = dataset, mapping

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return image, self.mapping[target]


def _relabel(dataset: Dataset, mapping: torch.Tensor) -> Dataset:
    if isinstance(dataset, TensorDataset):  # stays on the loaders' in-memory fast path
        images, targets = dataset.tensors
        return TensorDataset(images, mapping[targets])
    return Relabeled(dataset, mapping)


def relabeled(
    mapping: Sequence[int],
    class_names: Sequence[str] = (),
    source: str = "trainlab.data.datasets.load_digits",
    **source_args,
) -> DataSplits:
    """The splits of the loader ``source`` (a dotted path) with old label i → ``mapping[i]``."""
    splits = get_method(source)(**source_args)
    if splits.class_names and len(mapping) != len(splits.class_names):
        raise TrainlabError(
            f"data.dataset.mapping has {len(mapping)} entries; {source} has "
            f"{len(splits.class_names)} classes"
        )
    table = torch.tensor(list(mapping), dtype=torch.long)
    return DataSplits(
        train=_relabel(splits.train, table),
        val=_relabel(splits.val, table),
        test=None if splits.test is None else _relabel(splits.test, table),
        class_names=list(class_names) or [str(i) for i in sorted(set(mapping))],
    )
