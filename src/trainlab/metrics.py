"""Task-aware metrics: cheap device-side sums while training, torchmetrics when validating.

Training updates are device ops only (no host sync), read once per logging interval.
Validation uses torchmetrics, which is exact over batches of unequal size and sums over
DDP ranks. Classification: ``acc``, ``acc_top{k}`` (``trainer.top_k``), ``f1_macro``;
every task keeps a confusion matrix, drawn and tabulated per class for the best epoch.
Segmentation (1 output channel: binary with sigmoid; C channels: softmax): ``dice``,
``iou`` (mean over classes) and pixel ``acc``, ``ignore_index`` pixels left out.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainlab.errors import TrainlabError

TASKS = ("classification", "segmentation")


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over DDP ranks when a process group is up; a no-op otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


class TaskMetrics:
    """Which metrics a task computes; makes the per-epoch accumulators for the runner."""

    def __init__(
        self, task: str = "classification", num_classes: int | None = None,
        ignore_index: int | None = None, class_names: list[str] | None = None,
        top_k: int | None = 5,
    ) -> None:
        if task not in TASKS:
            raise TrainlabError(f"data.task={task!r}; choose one of {TASKS}")
        self.task, self.num_classes, self.ignore_index = task, num_classes, ignore_index
        self.top_k = top_k
        self.class_names = list(class_names or [])  # for the confusion matrix and table
        self._val: dict[str, ValMetrics] = {}  # by device, reused epoch after epoch

    @classmethod
    def from_config(cls, cfg, class_names: list[str] | None = None) -> TaskMetrics:
        """The metrics a run's config asks for (``data.task``, ``trainer.top_k``...)."""
        return cls(cfg.data.task, cfg.data.num_classes, cfg.data.get("ignore_index"),
                   class_names, cfg.trainer.get("top_k", 5))

    def top_k_name(self, num_classes: int | None) -> str | None:
        """``acc_top{k}`` when top-k accuracy says more than accuracy: 1 < k < classes."""
        k = self.top_k
        return f"acc_top{k}" if k and 1 < k < (num_classes or 0) else None

    @property
    def main(self) -> str:
        """The metric shown on every epoch line and tracked cheaply while training."""
        return "acc" if self.task == "classification" else "dice"

    def names(self) -> list[str]:
        """Every metric a run of this task logs per epoch (the valid ``trainer.monitor`` values)."""
        if self.task == "segmentation":
            val = ["loss", "dice", "iou", "acc"]
        else:
            top_k = self.top_k_name(self.num_classes)
            val = ["loss", "acc", *([top_k] if top_k else []), "f1_macro"]
        return [f"train/{name}" for name in ("loss_epoch", self.main)] + [
            f"val/{name}" for name in val
        ]

    def check_monitor(self, monitor: str) -> None:
        if monitor not in self.names():
            raise TrainlabError(
                f"trainer.monitor={monitor!r} is never computed for data.task={self.task}; "
                f"choose one of {self.names()}"
            )

    def train(self, device: torch.device | str = "cpu") -> TrainTotals:
        return TrainTotals(self, device)

    def val(self, device: torch.device | str = "cpu") -> ValMetrics:
        """Validation accumulators, emptied: built once per device, as building the
        torchmetrics objects costs more than validating a small model."""
        metrics = self._val.get(str(device))
        if metrics is None:
            metrics = self._val[str(device)] = ValMetrics(self, device)
        else:
            metrics.reset()
        return metrics


def _val_metrics(spec: TaskMetrics, num_classes: int) -> dict:
    """The torchmetrics objects of validation, by the name they are logged under."""
    from torchmetrics import classification as tm

    ignore = spec.ignore_index
    if spec.task == "classification":
        metrics = {"acc": tm.MulticlassAccuracy(num_classes, average="micro")}
        top_k = spec.top_k_name(num_classes)
        if top_k:
            metrics[top_k] = tm.MulticlassAccuracy(num_classes, top_k=spec.top_k, average="micro")
        metrics["f1_macro"] = tm.MulticlassF1Score(num_classes, average="macro")
        metrics["confusion"] = tm.MulticlassConfusionMatrix(num_classes)
        return metrics
    if num_classes == 1:
        return {
            "dice": tm.BinaryF1Score(ignore_index=ignore),  # Dice = F1 over all pixels
            "iou": tm.BinaryJaccardIndex(ignore_index=ignore),
            "acc": tm.BinaryAccuracy(ignore_index=ignore),
            "confusion": tm.BinaryConfusionMatrix(ignore_index=ignore),
        }
    return {
        "dice": tm.MulticlassF1Score(num_classes, average="macro", ignore_index=ignore),
        "iou": tm.MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore),
        "acc": tm.MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore),
        "confusion": tm.MulticlassConfusionMatrix(num_classes, ignore_index=ignore),
    }


class TrainTotals:
    """Loss sum and top-1 hits (classification) or a pixel confusion matrix (segmentation).

    ``update`` is device ops only; ``compute`` and ``window`` are where the host syncs.
    Classification keeps each step's detached loss, logits and targets and folds them into
    the sums in a few ops every ``reduce_every`` steps (or ``max_pending`` logit elements),
    or when read: on a small model each op per step costs about 1 % of the step.
    """

    reduce_every = 32
    max_pending = 1 << 20

    def __init__(self, spec: TaskMetrics, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.device = device
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.hits = torch.zeros((), device=device, dtype=torch.long)  # classification
        self.confusion: torch.Tensor | None = None  # segmentation, made at the first batch
        self.binary = False
        self.count = 0
        self._read = (0.0, 0)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_numel = 0

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        # Called every training step: detached inputs and in-place ops rather than a no_grad
        # context, since on a small model each extra op or context is a visible share of a step.
        n = targets.shape[0]
        self.count += n
        logits = logits.detach()
        if self.spec.task == "classification":
            self._pending.append((loss.detach(), logits, targets))
            self._pending_numel += logits.numel()
            if len(self._pending) >= self.reduce_every or self._pending_numel >= self.max_pending:
                self._reduce()
            return
        self.loss_sum.add_(loss.detach(), alpha=n)
        if logits.dim() == targets.dim() or logits.shape[1] == 1:  # binary: sigmoid > 0.5
            self.binary = True
            classes, preds = 2, (logits.reshape(targets.shape) > 0).long()
        else:
            classes, preds = logits.shape[1], logits.argmax(dim=1)
        targets = targets.long()
        if self.spec.ignore_index is not None:
            keep = targets != self.spec.ignore_index
            targets, preds = targets[keep], preds[keep]
        pairs = torch.bincount((targets * classes + preds).flatten(), minlength=classes**2)
        if self.confusion is None:
            self.confusion = torch.zeros_like(pairs)
        self.confusion += pairs[: classes**2]

    def _reduce(self) -> None:
        """Fold the pending classification steps into the sums, in a handful of ops."""
        if not self._pending:
            return
        losses, logits, targets = zip(*self._pending, strict=True)
        self._pending, self._pending_numel = [], 0
        sizes = torch.tensor([len(t) for t in targets], device=self.loss_sum.device)
        self.loss_sum += (torch.stack(losses).double() * sizes).sum()
        self.hits += torch.cat(logits).argmax(dim=1).eq_(torch.cat(targets)).sum()

    def compute(self) -> dict[str, float]:
        """Mean loss and the task's main metric over everything seen (summed over ranks)."""
        self._reduce()
        main = self.spec.main
        if self.count == 0:
            return {"loss": float("nan"), main: float("nan")}
        loss_sum, count = _all_reduce(
            torch.stack([self.loss_sum, torch.tensor(self.count, device=self.device)])
        ).tolist()
        if self.spec.task == "classification":
            return {"loss": loss_sum / count, "acc": _all_reduce(self.hits).item() / count}
        classes = int(round(self.confusion.numel() ** 0.5))
        matrix = _all_reduce(self.confusion).reshape(classes, classes).double()
        tp, seen = matrix.diag(), matrix.sum(0) + matrix.sum(1)
        dice = 2 * tp / seen.clamp_min(1)
        # binary: the foreground's Dice; multi-class: the mean over the classes present in
        # the targets or the predictions (as validation's torchmetrics counts them)
        present = dice[seen > 0]
        mean = present.mean() if len(present) else torch.tensor(1.0)
        return {"loss": loss_sum / count, "dice": (dice[1] if self.binary else mean).item()}

    def state_dict(self) -> dict:
        """The partial sums of an epoch, for a mid-epoch checkpoint (plain CPU tensors)."""
        self._reduce()
        return {"loss_sum": self.loss_sum.cpu(), "hits": self.hits.cpu(), "count": self.count,
                "confusion": None if self.confusion is None else self.confusion.cpu(),
                "binary": self.binary, "read": list(self._read)}

    def load_state_dict(self, state: dict) -> None:
        """Continue an epoch's sums where a mid-epoch checkpoint left them."""
        self.loss_sum = state["loss_sum"].to(self.device)
        self.hits = state["hits"].to(self.device)
        self.count = int(state["count"])
        confusion = state.get("confusion")
        self.confusion = None if confusion is None else confusion.to(self.device)
        self.binary = bool(state["binary"])
        self._read = (float(state["read"][0]), int(state["read"][1]))

    def window(self) -> float:
        """Mean loss over the samples seen since the previous call (for per-step logging)."""
        self._reduce()
        loss_sum, count = self.loss_sum.item(), self.count
        last_sum, last_count = self._read
        self._read = (loss_sum, count)
        seen = count - last_count
        return (loss_sum - last_sum) / seen if seen else float("nan")


class ValMetrics:
    """The task's torchmetrics plus the mean loss, exact over uneven batches and DDP ranks."""

    def __init__(self, spec: TaskMetrics, device: torch.device | str = "cpu") -> None:
        from torchmetrics import MeanMetric

        self.spec, self.device = spec, device
        self.loss = MeanMetric().to(device)
        self.metrics: dict | None = None  # made at the first batch if num_classes is unknown
        if spec.num_classes:
            self._build(spec.num_classes)

    def _build(self, num_classes: int) -> None:
        self.metrics = {
            name: metric.to(self.device)
            for name, metric in _val_metrics(self.spec, num_classes).items()
        }

    def reset(self) -> None:
        self.loss.reset()
        for metric in (self.metrics or {}).values():
            metric.reset()

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss.update(loss.detach(), weight=targets.shape[0])
        if self.metrics is None:
            self._build(logits.shape[1])
        if self.spec.task == "segmentation" and self.spec.num_classes == 1:
            logits = torch.sigmoid(logits.reshape(targets.shape))
        for metric in self.metrics.values():
            metric.update(logits, targets.long())

    def compute(self) -> dict[str, float]:
        """``loss`` and every metric of the task, as floats (the confusion matrix left out)."""
        values = {"loss": self.loss.compute().item()}
        for name, metric in (self.metrics or {}).items():
            if name != "confusion":
                values[name] = metric.compute().item()
        return values

    def confusion(self) -> torch.Tensor | None:
        """Counts of (true class, predicted class): samples, or pixels for segmentation."""
        metric = (self.metrics or {}).get("confusion")
        return None if metric is None else metric.compute().cpu()


def class_labels(spec: TaskMetrics, classes: int) -> list[str]:
    """The data's class names when they fit the matrix, else the class indices."""
    names = spec.class_names
    return names if len(names) == classes else [str(i) for i in range(classes)]


def per_class_table(matrix: torch.Tensor, names: list[str], task: str) -> str:
    """CSV of per-class scores from a confusion matrix: precision, recall and F1 with the
    support (classification), or IoU and Dice with the pixel count (segmentation)."""
    m = matrix.double()
    tp, predicted, actual = m.diag(), m.sum(0), m.sum(1)
    precision, recall = tp / predicted.clamp_min(1), tp / actual.clamp_min(1)
    f1 = 2 * tp / (predicted + actual).clamp_min(1)  # = Dice
    iou = tp / (predicted + actual - tp).clamp_min(1)
    if task == "classification":
        header, columns = "class,precision,recall,f1,support", (precision, recall, f1)
    else:
        header, columns = "class,iou,dice,precision,recall,pixels", (iou, f1, precision, recall)
    rows = [header]
    for index, name in enumerate(names):
        scores = ",".join(f"{column[index].item():.4f}" for column in columns)
        rows.append(f"{name},{scores},{int(actual[index].item())}")
    return "\n".join(rows) + "\n"


def confusion_report(
    matrix: torch.Tensor, spec: TaskMetrics, folder: str | Path, epoch: int
) -> list[Path]:
    """``confusion_matrix.png`` (counts and each true class normalised to 1, side by side)
    and ``per_class.csv`` of the epoch ``matrix`` comes from."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = class_labels(spec, matrix.shape[0])
    table = folder / "per_class.csv"
    table.write_text(per_class_table(matrix, names, spec.task))
    title = f"validation confusion matrix, epoch {epoch + 1}"
    return [plot_confusion(matrix, folder / "confusion_matrix.png", names, title), table]


def plot_confusion(
    matrix: torch.Tensor, path: str | Path, names: list[str] | None = None,
    title: str = "validation confusion matrix",
) -> Path:
    """Write ``matrix`` (rows: true class, columns: predicted) as PNG heat maps: the counts
    and the rows normalised (recall on the diagonal)."""
    from trainlab.plots import pyplot, save_figure

    plt = pyplot()

    classes = matrix.shape[0]
    names = names or [str(i) for i in range(classes)]
    normalised = matrix.double() / matrix.sum(1, keepdim=True).clamp_min(1)
    size = max(4.0, 0.45 * classes + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size))
    for ax, values, label, form in ((axes[0], matrix, "counts", "{:.0f}"),
                                    (axes[1], normalised, "normalised by true class", "{:.2f}")):
        ax.imshow(values.numpy(), cmap="Blues", vmin=0)
        ax.set(xlabel="predicted class", ylabel="true class", title=label)
        if classes <= 30:  # values and names stay readable up to here
            half = values.max().item() / 2
            ax.set(xticks=range(classes), yticks=range(classes))
            ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
            ax.set_yticklabels(names, fontsize=7)
            for row in range(classes):
                for col in range(classes):
                    value = values[row, col].item()
                    ax.text(col, row, form.format(value), ha="center", va="center", fontsize=7,
                            color="white" if value > half else "black")
    fig.suptitle(title)
    return save_figure(fig, path)
