"""Running metric totals kept on the device, so the hot loop never waits for the host."""

from __future__ import annotations

import torch


class ClassificationTotals:
    """Sums of loss and correct top-1 predictions over the samples seen so far.

    Updates are device ops only; ``compute`` (and ``window``) is where the host syncs, which
    the runner does once per logging interval, not per step.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.count = 0
        self._read = (0.0, 0)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        # Called every training step: detached inputs instead of a no_grad context, and
        # in-place ops, because on a small model each extra op or context costs ~1 % of a step.
        n = target.shape[0]
        self.loss_sum.add_(loss.detach(), alpha=n)
        self.correct.add_(logits.detach().argmax(dim=1).eq_(target).sum())
        self.count += n

    def compute(self) -> dict[str, float]:
        """Mean loss and accuracy over everything seen."""
        if self.count == 0:
            return {"loss": float("nan"), "acc": float("nan")}
        return {
            "loss": self.loss_sum.item() / self.count,
            "acc": self.correct.item() / self.count,
        }

    def window(self) -> float:
        """Mean loss over the samples seen since the previous call (for per-step logging)."""
        loss_sum, count = self.loss_sum.item(), self.count
        last_sum, last_count = self._read
        self._read = (loss_sum, count)
        seen = count - last_count
        return (loss_sum - last_sum) / seen if seen else float("nan")
