"""BatchNorm running statistics that describe the weights being validated.

torch keeps each BatchNorm's running mean and variance as an average that moves by
``momentum`` (10 %) towards every training batch's statistics, starting from mean 0 and
variance 1. With few batches per epoch (a laptop-sized subset, a small dataset) that average
is mostly the starting values and the statistics of weights long since changed: a fresh
U-Net's activations have a variance near 0.01, not 1, so in eval mode it predicts a
constant and ``val/dice`` stays 0.0 for epochs while ``train/dice`` climbs.

:class:`EpochStatistics` restarts the average at every epoch with the running mean of the
epoch's batches (weight ``1/k`` for its ``k``-th batch) until that weight falls to the
layer's ``momentum``, from where torch's own update goes on unchanged. Validation then
normalises with the statistics of the epoch just trained, close to what recomputing them
over the training data would give, at no extra forward pass. In epochs many times longer
than ``1/momentum`` batches the restart has faded by the end: they validate with what
torch's own update gives.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class EpochStatistics:
    """Turns each epoch's first ``1/momentum`` BatchNorm updates into a running mean.

    ``start_epoch`` before an epoch's first batch; ``after_batch(index)`` after the backward
    of its batch ``index`` (0-based; the backward still reads what the forward saw), before
    the optimizer step and the weight average read the statistics. The correction needs only
    the statistics before the batch, so a run resumed inside an epoch continues it exactly.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: list[_BatchNorm] = []
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.batches = 0.0

    def start_epoch(self) -> None:
        # found again every epoch: unfreezing turns frozen layers into BatchNorm mid-run
        self.layers = [
            layer for layer in self.model.modules()
            if isinstance(layer, _BatchNorm) and layer.track_running_stats and layer.momentum
        ]
        self.before = [(layer.running_mean.clone(), layer.running_var.clone())
                       for layer in self.layers]
        # from this many batches on every layer is left to torch: a step costs nothing more
        self.batches = max((1.0 / float(layer.momentum) for layer in self.layers), default=0.0)

    @torch.no_grad()
    def after_batch(self, index: int) -> None:
        if index + 1 >= self.batches:
            return
        weight = 1.0 / (index + 1)
        for layer, (mean, var) in zip(self.layers, self.before, strict=True):
            momentum = float(layer.momentum)
            if weight <= momentum:
                continue
            # torch moved each statistic from its value before the batch by momentum towards
            # the batch's: recover the batch's, then move by weight instead
            for running, previous in ((layer.running_mean, mean), (layer.running_var, var)):
                batch = running.sub(previous, alpha=1 - momentum).div_(momentum)
                running.copy_(previous.lerp_(batch, weight))
