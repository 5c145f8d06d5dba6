"""Regimen: a YAML recipe becomes a reproducible DeepSpeed run on Ray, tracked in MLflow."""

__version__ = "0.1.0"
