"""The baseline job: a hand-written loop with MLflow, as a course student writes it.

Digits from scikit-learn, MLP 64-256-10, Adam, batch 64, EPOCHS epochs, validation every
epoch; MLflow gets the params, per-epoch metrics and the best epoch's model (MLflow's
default format, or the one named by the second argument, e.g. ``pickle``).
"""

import copy
import sys

import mlflow
import mlflow.pytorch
import torch
from sklearn.datasets import load_digits
from torch import nn

EPOCHS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
MODEL_FORMAT = {"serialization_format": sys.argv[2]} if len(sys.argv) > 2 else {}

digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).reshape(-1, 64) / 16.0
y = torch.tensor(digits.target)
order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
train, val = order[360:], order[:360]
torch.manual_seed(42)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = nn.CrossEntropyLoss()
mlflow.set_experiment("handwritten")
with mlflow.start_run():
    mlflow.log_params({"lr": 1e-3, "batch_size": 64, "epochs": EPOCHS, "hidden": 256})
    best, best_state = -1.0, None
    for epoch in range(EPOCHS):
        model.train()
        shuffled = train[torch.randperm(len(train))]
        total = 0.0
        for start in range(0, len(shuffled), 64):
            batch = shuffled[start : start + 64]
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        model.eval()
        with torch.no_grad():
            logits = model(x[val])
            val_loss = loss_fn(logits, y[val]).item()
            val_acc = (logits.argmax(1) == y[val]).float().mean().item()
        mlflow.log_metrics({"train_loss": total / len(train), "val_loss": val_loss,
                            "val_acc": val_acc}, step=epoch)
        if val_acc > best:
            best, best_state = val_acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    mlflow.pytorch.log_model(model, name="model", input_example=x[val][:2].numpy(),
                             **MODEL_FORMAT)
