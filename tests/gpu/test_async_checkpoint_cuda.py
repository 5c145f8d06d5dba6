"""Async checkpoints and leading indicators on a CUDA device (bf16, ZeRO-2, NCCL world of 1).

DS_ACCELERATOR=cuda python -m pytest -m gpu tests/gpu/test_async_checkpoint_cuda.py -s
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from conftest import gpu_only, tiny_recipe

pytestmark = gpu_only()


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().float().cpu() for k, v in trainer.built.engine.module.state_dict().items()
    }


def test_async_rollback_and_indicators_on_cuda(tmp_path: Path, nccl_world: None) -> None:
    from orchestrator.engine.loop import StepHook, Trainer, WorkerContext

    guard = {"window": 16, "min_history": 4, "patience": 1, "good_after": 1, "skip_batches": 2}
    guard |= {"grad_norm_zscore": False, "indicators_every": 1}
    runs, blocked = {}, {}
    for mode in (False, True):
        recipe = tiny_recipe(
            tmp_path, precision="bf16", schedule={"steps": 12},
            checkpoint={"every": 2, "async": mode},
            deepspeed={"zero_optimization": {"stage": 2}}, stability=guard,
            techniques={"fault_injection": {"spike_at_step": 9, "spike_factor": 100.0}},
        )  # fmt: skip
        metrics: list[dict[str, float]] = []

        class Spy(StepHook):
            def after_step(self, trainer, out, metrics=metrics):
                metrics.append(out)

        trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / f"a{mode}"), [Spy()])
        summary = trainer.run()
        (rollback,) = [e for e in summary["events"] if e["kind"] == "rollback"]
        assert rollback["to_step"] == 8 and summary["steps"] == 12
        blocked[mode] = [e["blocked_s"] for e in summary["events"] if e["kind"] == "checkpoint"]
        rms = [m["indicator/update_rms_max"] for m in metrics if "indicator/update_rms_max" in m]
        assert rms and all(math.isfinite(v) and v > 0 for v in rms)
        assert all(math.isfinite(m["indicator/attn_entropy_min"]) for m in metrics)
        runs[mode] = _weights(trainer)
    assert all(torch.equal(runs[False][k], runs[True][k]) for k in runs[False])
    print(f"\nblocked per save: sync {blocked[False]}\nasync {blocked[True]}")


def test_async_blocking_vs_sync_mid_size_model(tmp_path: Path, nccl_world: None) -> None:
    """A ~0.17 B-parameter model: the time a save holds training, sync vs async."""
    import deepspeed
    import transformers

    from orchestrator.engine.checkpoint import CheckpointStore

    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
        config={"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
                "zero_optimization": {"stage": 2}},
    )  # fmt: skip
    ids = torch.randint(0, 32000, (1, 128), device=engine.device)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    store = CheckpointStore(tmp_path / "ck", keep=0)
    sync, asyn = [], []
    for step in range(1, 3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        store.save(engine, 2 * step, {})
        sync.append(time.perf_counter() - t)
        asyn.append(store.save_async(engine, 2 * step + 1, {}).blocked_s)
        store.wait()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    ratio = min(asyn) / min(sync)
    print(f"\n{params:.0f} M params: sync {sync} s, async blocked {asyn} s, ratio {ratio:.3f}")
    assert store.latest().step == 5
