"""The spike guard's detector history rolls back with the model (issue 17), on the
quickstart model: checkpoints 100 steps apart, a loss spike injected at step 200.

Before the fix the guard kept the statistics of the abandoned timeline (the later, smaller
losses and gradients of steps 100-199) after rolling back to step 100, flagged the healthy
steps right after the restore as grad_z spikes and rolled back again and again until the
job failed. The statistics pure-function tests are in tests/unit/techniques/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_recipe
from orchestrator.engine.loop import Trainer, WorkerContext

pytestmark = pytest.mark.integration


def _quickstart(tmp_path: Path, steps: int, **sections):
    """The quickstart's model, optimizer and warmup at world size 1; shorter sequences."""
    quick = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    return tiny_recipe(
        tmp_path,
        replace={
            "model": quick["model"],
            "data": {**quick["data"], "seq_len": 64},
            "optimizer": quick["optimizer"],
            "techniques": quick["techniques"],
        },
        schedule={"steps": steps, "micro_batch_size": 8, "eval_every": 0},
        checkpoint={"every": 100, "keep": 2},
        **sections,
    )


def test_no_detection_on_the_healthy_steps_after_a_rollback(tmp_path, gloo_world):
    faults = {"spike_at_step": 200, "spike_steps": 3, "spike_factor": 100.0}
    recipe = _quickstart(tmp_path, 215, stability={}, techniques={"fault_injection": faults})
    summary = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run")).run()
    events = summary["events"]
    (rollback,) = [e for e in events if e["kind"] == "rollback"]
    assert rollback["from_step"] == 202 and rollback["to_step"] == 100
    (restored,) = [e for e in events if e["kind"] == "detector_restored"]
    assert restored["to_step"] == 100 and restored["loss_history"] > 20
    after = events[events.index(rollback) + 1 :]
    assert [e for e in after if e["kind"] == "spike"] == [], "a healthy step after the restore"
    # nothing but the injected spike was ever flagged (early training included)
    spikes = [(e["at_step"], e["detector"]) for e in events if e["kind"] == "spike"]
    assert spikes == [(200, "loss_z"), (201, "loss_z")]
    assert summary["steps"] == 215 and summary["rollbacks"] == 1
    assert summary["skipped_steps"] == 2
