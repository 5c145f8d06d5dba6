"""Shared fixtures: tiny recipes, an in-process gloo group, MLflow sqlite, a Ray session."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

REPO = Path(__file__).resolve().parents[1]

TINY_RECIPE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "model": {
        "kind": "hf_config",
        "architecture": "llama",
        "config": {
            "vocab_size": 256,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
        },
    },
    "data": {"kind": "stdlib_bytes", "seq_len": 32, "max_bytes": 200_000},
    "optimizer": {"name": "adamw", "lr": 3e-3},
    "schedule": {"steps": 8, "micro_batch_size": 4},
    "checkpoint": {"every": 4, "keep": 0},
    "resources": {"workers": 1},
}


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_recipe(tmp_path: Path, **sections: Any) -> Any:
    """A validated tiny Recipe; keyword sections are deep-merged over the defaults."""
    from orchestrator.errors import RecipeError
    from orchestrator.recipe.dotted import deep_merge
    from orchestrator.recipe.loader import _Problems, validate_data

    data = deep_merge(TINY_RECIPE, sections)
    data.setdefault("checkpoint", {}).setdefault("storage", str(tmp_path / "runs"))
    data.setdefault("tracking", {}).setdefault("uri", f"sqlite:///{tmp_path}/mlflow.db")
    problems = _Problems("<test>")
    recipe = validate_data(data, problems)
    if recipe is None:
        raise RecipeError(problems.items)
    return recipe


def init_one_process_group(backend: str) -> None:
    """A torch.distributed world of one process (rank 0), unless one exists already.

    Never destroyed: DeepSpeed caches the world group, so a re-created one would not be
    the group it knows."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
    )
    dist.init_process_group(backend, rank=0, world_size=1)


@pytest.fixture(scope="session")
def gloo_world() -> Iterator[None]:
    """A one-process torch.distributed group (gloo), as DeepSpeed needs one."""
    init_one_process_group("gloo")
    yield


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    """A fresh MLflow sqlite store for one test."""
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One embedded local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    from orchestrator.cluster.launch import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()
