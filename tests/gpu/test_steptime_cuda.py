"""The step-time split on a CUDA device: CUDA events, read back on logged steps only.

DS_ACCELERATOR=cuda python -m pytest -m gpu tests/gpu/test_steptime_cuda.py -s
"""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import gpu_only, tiny_recipe
from orchestrator.engine.steptime import StepClock

pytestmark = gpu_only()

PHASES = ("time/forward_s", "time/backward_s", "time/optimizer_s")


def test_the_clock_times_gpu_work_with_events() -> None:
    clock = StepClock()
    a = torch.randn(2048, 2048, device="cuda")
    clock.begin(a.device)
    clock.mark()
    for _ in range(20):
        a = a @ a / 2048
    clock.lap("forward")
    out = clock.metrics()  # waits for the last event: no sync before
    assert out["time/forward_s"] > 0 and out["time/forward_s"] <= out["time/step_s"]


def test_a_cuda_run_logs_the_split_at_logged_steps(tmp_path: Path, nccl_world: None) -> None:
    from orchestrator.engine.loop import StepHook, Trainer, WorkerContext

    seen: dict[int, dict[str, float]] = {}

    class Keep(StepHook):
        def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            seen[trainer.state.step] = metrics

    recipe = tiny_recipe(
        tmp_path, precision="bf16", schedule={"steps": 6, "log_every": 3, "grad_accumulation": 2}
    )
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"), step_hooks=[Keep()])
    trainer.run()
    assert next(trainer.built.engine.module.parameters()).is_cuda
    assert {s for s, m in seen.items() if "time/step_s" in m} == {3, 6}
    for step in (3, 6):
        m = seen[step]
        assert all(m[k] > 0 for k in (*PHASES, "time/data_s", "time/step_s")), m
        assert sum(m[k] for k in PHASES) <= m["time/step_s"]
