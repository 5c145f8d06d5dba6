"""The `model.config` keys (and their defaults) of the builtin models, `vit` and `mlp`.

The recipe checks `model.config` against these without importing torch;
:mod:`orchestrator.engine.vision` builds the models from them.
"""

from __future__ import annotations

from typing import Any

VIT_DEFAULTS: dict[str, Any] = {
    "image_size": 8,
    "patch_size": 2,
    "channels": 1,
    "num_classes": 10,
    "dim": 64,
    "depth": 4,
    "heads": 4,
    "mlp_ratio": 2.0,
    "dropout": 0.1,
    "drop_path": 0.1,
}
MLP_DEFAULTS: dict[str, Any] = {
    "in_features": 64,
    "hidden": 64,
    "depth": 2,
    "num_classes": 10,
    "dropout": 0.1,
}
DEFAULTS = {"vit": VIT_DEFAULTS, "mlp": MLP_DEFAULTS}


def unknown_keys(architecture: str, config: dict[str, Any]) -> list[str]:
    """Keys of ``config`` that the builtin ``architecture`` does not take."""
    return sorted(set(config) - set(DEFAULTS.get(architecture, {})))
