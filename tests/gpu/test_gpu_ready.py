"""Regimen on one CUDA device over NCCL: every technique with every collective forced, bf16
under ZeRO-2 with fused AdamW and the throughput metrics, and a bit-exact fp32 resume with
dropout on (the CUDA RNG state travels in the checkpoint).

Two NCCL ranks cannot share the one lent GPU (NCCL refuses two ranks on one device), so
this is an NCCL world of ONE process with every collective forced (``force_collectives``):
each all-reduce, broadcast and all-gather really goes through NCCL with CUDA tensors, the
same code path as eight GPUs; what it cannot show is ranks that disagree (the CPU tests
with gloo and two processes carry that). Skipped cleanly without CUDA:

    DS_ACCELERATOR=cuda python -m pytest -m gpu tests/gpu/test_gpu_ready.py
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from conftest import gpu_only, tiny_recipe
from orchestrator import distributed as D

# cuBLAS is deterministic only with a fixed workspace; set before the first matmul
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = gpu_only()

LAYERS = 4
GUARD = {"window": 16, "min_history": 4, "patience": 1, "good_after": 1, "skip_batches": 2}
GUARD |= {"grad_norm_zscore": False, "indicators_every": 1}
LM_STAGES = {
    "stages": [
        {"name": "first", "steps": 6},
        {"name": "second", "steps": 6, "data": {"kind": "stdlib_bytes", "seq_len": 32,
                                                 "max_bytes": 120_000}},
    ],
    "replay": {"size": 8, "policy": "task_balanced", "ratio": 0.5},
    "eval": {"every": 2, "subset_size": 4},
}  # fmt: skip


def every_technique(tmp_path: Path, **sections: Any) -> Any:
    """The tiny LLaMA with warmup, dropout, LISA, SGG, continual learning, the spike guard
    with its leading indicators, and a spike at step 11 that rolls back (the guard restarts
    its statistics at the stage switch, step 6, and is armed again 4 steps later)."""
    techniques = {
        "warmup": {"warmup_steps": 3, "schedule": "cosine"},
        "dropout": {"mode": "standard", "rate": 0.1},
        "lisa": {"gamma": 2, "interval": 2},
        "sgg": {"clusters": 2, "recluster_interval": 4},
        "fault_injection": {"spike_at_step": 11, "spike_factor": 100.0},
    }
    return tiny_recipe(
        tmp_path,
        model={"config": {"num_hidden_layers": LAYERS}},
        schedule={"steps": 12},
        checkpoint={"every": 2},
        stability=GUARD,
        continual=LM_STAGES,
        techniques=techniques,
        **sections,
    )


class DeviceSpy:
    """Wraps one torch.distributed collective, noting the device of every tensor it gets."""

    def __init__(self, real: Any):
        self.real = real
        self.devices: list[torch.device] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for a in args:
            for t in a if isinstance(a, list) else [a]:
                if isinstance(t, torch.Tensor):
                    self.devices.append(t.device)
        return self.real(*args, **kwargs)


def test_every_technique_with_every_collective_forced_on_nccl(
    tmp_path: Path, nccl_world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.engine.loop import Trainer, WorkerContext

    spies = {}
    for name in ("all_reduce", "broadcast", "all_gather"):
        spies[name] = DeviceSpy(getattr(dist, name))
        monkeypatch.setattr(D.dist, name, spies[name])
    recipe = every_technique(tmp_path, precision="bf16")
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"))
    with D.force_collectives():
        summary = trainer.run()
    assert summary["finished"] and summary["steps"] == 12
    kinds = {e["kind"] for e in summary["events"]}
    assert {"spike", "rollback", "lisa_switch"} <= kinds, kinds
    assert math.isfinite(summary["final_loss"])
    assert set(summary["continual"]["metrics"]) >= {"final_avg_loss", "bwt"}
    assert spies["all_reduce"].devices and spies["broadcast"].devices  # they really ran
    # every tensor our helper handed NCCL was on this rank's GPU (DeepSpeed's own too)
    seen = {d for s in spies.values() for d in s.devices}
    assert seen == {torch.device("cuda", 0)}, seen


def test_bf16_zero2_fused_adamw_and_throughput_metrics(tmp_path: Path, nccl_world: None) -> None:
    from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
    from orchestrator.engine.throughput import peak_flops

    metrics: list[dict[str, float]] = []

    class Spy(StepHook):
        def after_step(self, trainer: Trainer, out: dict[str, float]) -> None:
            metrics.append(out)

    recipe = tiny_recipe(
        tmp_path,
        precision="bf16",
        schedule={"steps": 6},
        checkpoint={"every": 0, "at_end": False},
        deepspeed={"zero_optimization": {"stage": 2}},
    )
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"), [Spy()])
    trainer.run()
    assert trainer.built.optimizer.defaults["fused"] is True  # the CUDA kernel, not the loop
    param = next(trainer.built.engine.module.parameters())
    assert param.is_cuda and param.dtype == torch.bfloat16
    assert all(m["tokens_per_s"] > 0 for m in metrics)
    if peak_flops(torch.cuda.get_device_name(0), "bf16") is not None:
        assert all(0 < m["mfu"] < 1 for m in metrics)
    else:  # a GPU the table does not know: no MFU rather than a wrong one
        assert not any("mfu" in m for m in metrics)


def _weights(trainer: Any) -> dict[str, torch.Tensor]:
    state = trainer.built.engine.module.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def test_resume_is_bit_exact_in_fp32_with_dropout(
    tmp_path: Path, nccl_world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 steps straight == 6 + checkpoint + resume + 6, with dropout drawing from the CUDA
    generator; without the CUDA RNG state in the checkpoint the resumed run differs."""
    from orchestrator.engine import recovery
    from orchestrator.engine.loop import Trainer, WorkerContext

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        recipe = tiny_recipe(
            tmp_path,
            schedule={"steps": 12},
            checkpoint={"every": 6},
            techniques={"dropout": {"mode": "standard", "rate": 0.2}},
        )
        straight = Trainer(recipe, WorkerContext(run_dir=tmp_path / "straight"))
        straight.run()

        def resumed(name: str) -> Trainer:
            Trainer(recipe, WorkerContext(run_dir=tmp_path / name, stop_after_steps=6)).run()
            trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / name))
            trainer.run()
            assert trainer.events[0]["kind"] == "resume" and trainer.events[0]["from_step"] == 6
            return trainer

        again = resumed("resumed")
        saved = again.store.load_rank_state(again.store.latest(6), 0)
        assert len(saved["rng"]["cuda"]) == torch.cuda.device_count()
        a, b = _weights(straight), _weights(again)
        assert all(torch.equal(a[k], b[k]) for k in a), "resume is not bit-exact"

        real = recovery.set_rng_state
        monkeypatch.setattr(
            recovery,
            "set_rng_state",
            lambda state: real({k: v for k, v in state.items() if k != "cuda"}),
        )
        blind = _weights(resumed("without-cuda-rng"))
        assert any(not torch.equal(a[k], blind[k]) for k in a), "dropout did not use CUDA RNG"
    finally:
        torch.use_deterministic_algorithms(False)


# ZeRO-3 on the GPU: the zero-skip helper's slice of issue 15 adds its test here.
# Export on the GPU: the export helper's slice adds `test_export_on_gpu` here.
