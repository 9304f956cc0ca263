"""trainlab: Hydra-composed PyTorch experiments, every run tracked in MLflow."""

__version__ = "0.1.0"
