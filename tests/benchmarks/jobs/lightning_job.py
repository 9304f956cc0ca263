"""The same job in PyTorch Lightning with its MLFlowLogger and a best-checkpoint callback."""

import logging
import sys
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EPOCHS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


class Digits(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters({"lr": 1e-3, "batch_size": 64, "hidden": 256})
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

    def training_step(self, batch, _):
        inputs, targets = batch
        loss = nn.functional.cross_entropy(self.net(inputs), targets)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, _):
        inputs, targets = batch
        logits = self.net(inputs)
        self.log("val_loss", nn.functional.cross_entropy(logits, targets))
        self.log("val_acc", (logits.argmax(1) == targets).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).reshape(-1, 64) / 16.0
y = torch.tensor(digits.target)
order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
train, val = order[360:], order[:360]
L.seed_everything(42, verbose=False)
trainer = L.Trainer(
    max_epochs=EPOCHS, accelerator="cpu", devices=1, enable_progress_bar=False,
    logger=MLFlowLogger(experiment_name="lightning", log_model=True),
    callbacks=[ModelCheckpoint(monitor="val_acc", mode="max")], enable_model_summary=False,
)
trainer.fit(Digits(), DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True),
            DataLoader(TensorDataset(x[val], y[val]), batch_size=64))
