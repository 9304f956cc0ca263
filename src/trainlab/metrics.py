"""Running metric totals kept on the device, so the hot loop never waits for the host."""

from __future__ import annotations

import torch


class ClassificationTotals:
    """Sums of loss and correct top-1 predictions over the samples seen so far.

    ``update`` runs every training step, where on a small model each tensor op costs ~1 % of
    the step: it only keeps (detached) references, and the sums are reduced on the device in
    one go every ``reduce_every`` updates, when the kept logits pass ``max_pending`` elements,
    or when read. ``compute`` (and ``window``) is where the host syncs, which the runner does
    once per logging interval, not per step.
    """

    def __init__(
        self, device: torch.device | str = "cpu", reduce_every: int = 32, max_pending: int = 1 << 20
    ) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.count = 0
        self.reduce_every = reduce_every
        self.max_pending = max_pending
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_numel = 0
        self._read = (0.0, 0)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        self._pending.append((loss.detach(), logits.detach(), target))
        self.count += target.shape[0]
        self._pending_numel += logits.numel()
        if len(self._pending) >= self.reduce_every or self._pending_numel >= self.max_pending:
            self._reduce()

    def _reduce(self) -> None:
        """Fold the pending batches into the sums: a handful of ops for all of them."""
        if not self._pending:
            return
        losses, logits, targets = zip(*self._pending, strict=True)
        self._pending, self._pending_numel = [], 0
        sizes = torch.tensor([len(t) for t in targets], device=self.loss_sum.device)
        self.loss_sum += (torch.stack(losses).double() * sizes).sum()
        self.correct += torch.cat(logits).argmax(dim=1).eq_(torch.cat(targets)).sum()

    def compute(self) -> dict[str, float]:
        """Mean loss and accuracy over everything seen."""
        if self.count == 0:
            return {"loss": float("nan"), "acc": float("nan")}
        self._reduce()
        return {
            "loss": self.loss_sum.item() / self.count,
            "acc": self.correct.item() / self.count,
        }

    def window(self) -> float:
        """Mean loss over the samples seen since the previous call (for per-step logging)."""
        self._reduce()
        loss_sum, count = self.loss_sum.item(), self.count
        last_sum, last_count = self._read
        self._read = (loss_sum, count)
        seen = count - last_count
        return (loss_sum - last_sum) / seen if seen else float("nan")
