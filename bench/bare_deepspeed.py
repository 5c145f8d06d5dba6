"""The bare DeepSpeed loop a person would write, the baseline of bench/overhead and
bench/startup: same model, data and DeepSpeed config as a Regimen recipe, no Ray, no
MLflow, no Regimen loop (forward, backward, step, ``loss.item()``).

As a script it is one fresh world-1 process (gloo), the start-up baseline::

    python bench/bare_deepspeed.py RECIPE.yaml OUT.json

OUT.json: ``{"process_start", "first_step", "end"}`` (epoch s) and ``step_times`` (s).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def rank_env(rank: int, world: int, port: int) -> None:
    """The torch.distributed environment of one rank."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK="0",
    )


def bare_train(recipe_path: str, rank: int, world: int, port: int) -> dict[str, Any]:
    """Train the recipe's model for ``schedule.steps`` steps on one rank; step times and the
    wall-clock moment the first step ended."""
    rank_env(rank, world, port)
    import deepspeed
    import torch
    import torch.distributed as dist

    from orchestrator.data import BatchSource, build_data
    from orchestrator.engine.ds_config import build_ds_config
    from orchestrator.engine.models import build_model
    from orchestrator.recipe.loader import load_recipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    recipe = load_recipe(recipe_path).recipe
    data = build_data(recipe.data)
    source = BatchSource(data.train, recipe.seed, recipe.schedule.micro_batch_size, rank, world)
    model = build_model(recipe.model, recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.optimizer.lr, foreach=False)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, config=build_ds_config(recipe)
    )
    times: list[float] = []
    first_step = None
    cursor = 0
    for _ in range(recipe.schedule.steps):
        t0 = time.perf_counter()
        batch = source.micro_batch_at(cursor, 0)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        float(loss.detach())
        cursor += recipe.global_batch_size
        times.append(time.perf_counter() - t0)
        first_step = first_step or time.time()
    dist.destroy_process_group()
    return {"step_times": times, "first_step": first_step}


def main() -> None:
    """One fresh world-1 process: train, write the marks (see the module docstring)."""
    import psutil

    from tests.conftest import free_port

    recipe_path, out = sys.argv[1], sys.argv[2]
    got = bare_train(recipe_path, 0, 1, free_port())
    got["process_start"] = psutil.Process().create_time()
    got["end"] = time.time()
    Path(out).write_text(json.dumps(got))


if __name__ == "__main__":
    main()
