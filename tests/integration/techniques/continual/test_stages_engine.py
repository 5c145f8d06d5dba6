"""Continual learning through the real Trainer: a rollback restores the replay buffer with
the weights (moved from tests/unit/techniques/continual/test_stages.py: a DeepSpeed run
takes seconds)."""

from __future__ import annotations

import pytest
import torch
from unit.techniques.continual.test_stages import GUARD

from conftest import tiny_recipe
from orchestrator.engine.loop import Trainer, WorkerContext
from orchestrator.techniques.continual.technique import Continual

pytestmark = pytest.mark.integration


LM_STAGES = {
    "stages": [
        {"name": "first", "steps": 6},
        {"name": "second", "steps": 6, "data": {"kind": "stdlib_bytes", "seq_len": 32,
                                                 "max_bytes": 120_000}},
    ],
    "replay": {"size": 8, "policy": "task_balanced", "ratio": 0.5},
    "eval": {"every": 2, "subset_size": 4},
}  # fmt: skip


def _buffer(trainer: Trainer) -> dict:
    return next(t for t in trainer.techniques if isinstance(t, Continual)).buffer.state_dict()


def test_rollback_restores_the_buffer_with_the_weights(tmp_path, gloo_world):
    """A spike at step 11 rolls back to step 10 and skips that data: the buffer must equal a
    clean run's that skipped the same data from the start (it would also hold the abandoned
    steps' samples if it were not restored). The guard restarts its statistics at the stage
    switch (step 6) and is armed again 4 healthy steps later."""
    sections = {"schedule": {"steps": 12}, "checkpoint": {"every": 2}, "continual": LM_STAGES}
    spiky = tiny_recipe(
        tmp_path, stability=GUARD,
        techniques={"fault_injection": {"spike_at_step": 11, "spike_factor": 100.0}}, **sections,
    )  # fmt: skip
    trainer = Trainer(spiky, WorkerContext(run_dir=tmp_path / "spiky"))
    summary = trainer.run()
    (rollback,) = [e for e in summary["events"] if e["kind"] == "rollback"]
    assert rollback["to_step"] == 10
    clean = Trainer(
        tiny_recipe(tmp_path, stability=GUARD, **sections),
        WorkerContext(run_dir=tmp_path / "clean"),
    )
    build = clean._build

    def build_with_skip() -> None:
        build()
        clean.loop.skip_ranges = list(trainer.loop.skip_ranges)

    clean._build = build_with_skip  # type: ignore[method-assign]
    clean.run()
    a, b = _buffer(trainer), _buffer(clean)
    assert a["seen"] == b["seen"] and all(
        torch.equal(a[k], b[k]) for k in ("task", "index", "label", "rng")
    )
    # 12 steps of 4 fresh samples, then 2 replayed of 4: 4 + 11 * 2 seen in the final timeline
    assert a["seen"] == 4 + 11 * 2
    assert set(summary["continual"]["metrics"]) >= {"final_avg_loss", "avg_max_loss", "bwt"}
