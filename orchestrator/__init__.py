"""Regimen: a YAML recipe becomes a reproducible DeepSpeed training run on Ray, tracked in MLflow."""

__version__ = "0.1.0"
