"""The CUDA paths CI cannot run: bf16 DeepSpeed on a GPU with NCCL, LISA under ZeRO-2 there.

Skipped without a CUDA device. On a GPU machine run them with DeepSpeed's CUDA
accelerator (the test conftest defaults it to the CPU one):

    DS_ACCELERATOR=cuda python -m pytest -m gpu tests/gpu
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from conftest import gpu_only, tiny_recipe

pytestmark = gpu_only()

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def test_bf16_run_trains_on_the_gpu_and_resumes(tmp_path: Path, nccl_world: None) -> None:
    from orchestrator.engine.loop import Trainer, WorkerContext

    recipe = tiny_recipe(
        tmp_path,
        precision="bf16",
        schedule={"steps": 12, "eval_batches": 2},
        checkpoint={"every": 6},
        deepspeed={"zero_optimization": {"stage": 2}},
    )
    first = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run", stop_after_steps=6))
    first.run()
    param = next(first.built.engine.module.parameters())
    assert param.is_cuda and param.dtype == torch.bfloat16
    resumed = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"))
    summary = resumed.run()
    assert resumed.events[0]["kind"] == "resume" and resumed.events[0]["from_step"] == 6
    assert summary["steps"] == 12 and math.isfinite(summary["final_loss"])
    assert summary["eval_loss"] is not None and math.isfinite(summary["eval_loss"])


def test_lisa_under_zero2_bf16_trains_only_the_sampled_layers(
    tmp_path: Path, nccl_world: None
) -> None:
    from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
    from orchestrator.techniques.lisa import LisaConfig, sample_layers

    layers = 4
    recipe = tiny_recipe(
        tmp_path,
        precision="bf16",
        model={"config": {"num_hidden_layers": layers}},
        schedule={"steps": 6},
        checkpoint={"every": 0, "at_end": False},
        techniques={"lisa": {"gamma": 1, "interval": 2}},
        deepspeed={"zero_optimization": {"stage": 2}},
    )
    seen: list[tuple[int, set[int], float]] = []

    class Recording(StepHook):
        before: dict[str, torch.Tensor] = {}

        def before_step(self, trainer: Trainer) -> None:
            self.before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

        def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            params = trainer.model.named_parameters()
            changed = {n for n, p in params if not torch.equal(p, self.before[n])}
            moved = {int(m.group(1)) for n in changed if (m := _LAYER_RE.search(n))}
            seen.append((trainer.state.step, moved, metrics["lisa/optimizer_state_bytes"]))

    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"), [Recording()])
    trainer.run()
    cfg = LisaConfig(gamma=1, interval=2)
    outside = sum(p.numel() for n, p in trainer.model.named_parameters() if not _LAYER_RE.search(n))
    per_layer = sum(p.numel() for n, p in trainer.model.named_parameters() if ".layers.0." in n)
    for step, moved, state_bytes in seen:
        assert moved == set(sample_layers(cfg, layers, recipe.seed, (step - 1) // 2)), step
        # bf16 under ZeRO-2: fp32 master + two fp32 moments for the active set only
        assert 12 * (outside + per_layer) <= state_bytes <= 12 * (outside + per_layer) * 1.02
