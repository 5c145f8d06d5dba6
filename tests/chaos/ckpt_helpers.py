"""Helpers shared by the chaos tests: trial counts, a tiny real DeepSpeed engine, a child
process that saves checkpoints in a loop (to be SIGKILLed), and a loader that checks one."""

from __future__ import annotations

import os
import random
import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import nn

FULL = os.environ.get("REGIMEN_CHAOS_FULL") == "1"


def trials(ci: int, full: int) -> int:
    """``full`` trials with REGIMEN_CHAOS_FULL=1, else the short CI count."""
    return full if FULL else ci


def chaos_rng(name: str) -> random.Random:
    """A seeded RNG per test (REGIMEN_CHAOS_SEED overrides) so a failing trial can be replayed."""
    seed = int(os.environ.get("REGIMEN_CHAOS_SEED", "0"))
    return random.Random(f"{name}:{seed}")


def make_engine(width: int = 16, seed: int = 0) -> Any:
    """A real DeepSpeed ZeRO-1 engine (CPU, gloo world of 1) over a 2-layer MLP."""
    import deepspeed

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        config={
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 1},
            "steps_per_print": 10**9,
        },
    )
    return engine


def train_step(engine: Any, seed: int, width: int = 16) -> None:
    """One deterministic optimizer step."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, width, generator=g), torch.randn(2, width, generator=g)
    loss = nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()


# The child: saves a checkpoint after every step, forever, printing "saving N" / "saved N".
SAVER = textwrap.dedent(
    """
    import os, sys, socket
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    sys.path.insert(0, sys.argv[2])
    from ckpt_helpers import make_engine, train_step
    from orchestrator.engine.checkpoint import CheckpointStore
    import torch
    engine = make_engine(width=int(sys.argv[3]))
    store = CheckpointStore(sys.argv[1], keep=int(sys.argv[4]))
    last = store.latest()
    step = 0
    if last is not None:
        store.load_engine(engine, last)
        step = store.load_rank_state(last, 0)["step"]
    print("ready", step, flush=True)
    while True:
        step += 1
        train_step(engine, step, int(sys.argv[3]))
        print("saving", step, flush=True)
        state = {"step": step, "w": engine.module[0].weight.detach().clone()}
        store.save(engine, step, state, meta={"step": step})
        print("saved", step, flush=True)
    """
)


def check_loadable(root: Path, width: int = 16) -> int | None:
    """Verify and load ``CheckpointStore(root).latest()`` into a fresh engine (needs a gloo
    world in this process); return its step, or None when there is none."""
    from orchestrator.engine.checkpoint import CheckpointStore

    store = CheckpointStore(root, keep=0)
    info = store.latest()
    if info is None:
        return None
    store.verify(info)  # every file present and matching its SHA-256
    engine = make_engine(width=width, seed=123)
    store.load_engine(engine, info)
    state = store.load_rank_state(info, 0)
    assert state["step"] == info.step == info.manifest["meta"]["step"]
    assert torch.equal(engine.module[0].weight.detach(), state["w"])  # engine and rank state agree
    return info.step
