"""Helpers for tests that drive `regimen` as real processes on the tiny digits MLP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from conftest import REPO


def mlp_recipe(
    steps: int = 40, every: int = 20, keep: int = 2, workers: int = 1, **sections: Any
) -> dict[str, Any]:
    """The cheapest real recipe: builtin MLP (hidden 16) on 8x8 digits, Ray workers of 1 CPU."""
    recipe: dict[str, Any] = {
        "name": "mlp",
        "seed": 0,
        "model": {
            "kind": "builtin",
            "architecture": "mlp",
            "config": {"hidden": 16, "depth": 1, "dropout": 0.0},
        },
        "data": {"kind": "digits", "eval_fraction": 0.2},
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "schedule": {"steps": steps, "micro_batch_size": 8, "eval_every": 0, "eval_batches": 1},
        "checkpoint": {"every": every, "keep": keep, "storage": "./runs"},
        "resources": {"workers": workers, "cpus_per_worker": 1, "max_restarts": 1},
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "chaos"},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    """Write ``recipe`` as YAML to ``path``."""
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def regimen(
    cwd: Path, *args: str, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.Popen[str]:
    """Start `python -m orchestrator.cli ARGS` in ``cwd`` in its own session (for killpg)."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )
