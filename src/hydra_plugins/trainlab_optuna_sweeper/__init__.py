"""trainlab's Hydra sweeper on Optuna ≥ 4 (``hydra/sweeper=optuna``), with pruning and resume."""
