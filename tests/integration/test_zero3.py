"""ZeRO-3 on 2 Ray workers (gloo, CPU) with the quickstart model: warmup, dropout and the
spike guard; an injected spike is rolled back, a killed worker resumes from its checkpoint,
and the weights (gathered from the partitioned checkpoint) are those of an undisturbed run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, tiny_recipe
from orchestrator.recipe.jobspec import JobSpec

pytestmark = pytest.mark.integration

QUICKSTART = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
GUARD = {"window": 16, "min_history": 4, "patience": 1, "good_after": 1, "skip_batches": 2}
GUARD |= {"grad_norm_zscore": False}


def _job(tmp_path: Path, faults: dict) -> object:
    from orchestrator.control.controller import run_job

    recipe = tiny_recipe(
        tmp_path,
        replace={"model": QUICKSTART["model"], "data": {**QUICKSTART["data"], "seq_len": 32}},
        schedule={"steps": 12, "micro_batch_size": 2},
        checkpoint={"every": 2, "keep": 0},
        stability=GUARD,
        techniques={
            "warmup": {"warmup_steps": 3},
            # the cut-off after the spike: it marks a regime change (the guard re-arms from there)
            "dropout": {"rate": 0.1, "cutoff_steps": 10},
            "fault_injection": faults,
        },
        resources={"workers": 2, "max_restarts": 1},
        deepspeed={"zero_optimization": {"stage": 3}},
    )
    return run_job(JobSpec.of("zero3", recipe))


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag="ds")


def test_zero3_rollback_and_resume_on_two_workers(tmp_path, ray_local):
    spike = {"spike_at_step": 7, "spike_factor": 100.0}
    clean = _job(tmp_path / "clean", spike)
    killed = _job(tmp_path / "killed", {**spike, "kill_at_step": 9, "kill_rank": 1})
    for result in (clean, killed):
        assert result.status == "FINISHED", result.error
        assert result.steps == 12 and result.rollbacks == 1
    assert (Path(killed.run_dir) / "faults" / "kill.fired").exists()
    a, b = _weights(clean.checkpoint), _weights(killed.checkpoint)
    assert len(a) > 10 and a.keys() == b.keys()
    assert all(a[k].numel() > 0 and torch.equal(a[k], b[k]) for k in a)
