"""A Ray Train worker killed (``os._exit``, like SIGKILL/OOM) at random steps: every run
restarts from its last checkpoint and ends with weights bit-identical to an uninterrupted
run. 1 trial in CI, 10 with REGIMEN_CHAOS_FULL=1 (steps and ranks drawn from a seeded RNG).

Reuses the fixed-step test's helpers (``tests/integration/test_rollback.py``): the same
2-worker tiny LLaMA job under ZeRO-1 with ``max_restarts: 1``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from chaos.ckpt_helpers import chaos_rng, trials
from integration.test_rollback import BASE, _job, _model_states

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def test_random_worker_kills_recover_identical_weights(tmp_path: Path, ray_local: None) -> None:
    n = trials(ci=1, full=10)
    rng = chaos_rng("worker-kill")
    steps = BASE["schedule"]["steps"]
    clean, _ = _job(tmp_path / "clean")
    assert clean.status == "FINISHED", clean.error
    reference = _model_states(clean.checkpoint)
    figures = {"trials": n, "failures": 0, "recovered": 0, "lost": 0}
    for trial in range(n):
        step, rank = rng.randrange(1, steps), rng.randrange(2)
        fault = {"kill_at_step": step, "kill_rank": rank}
        result, _ = _job(tmp_path / f"t{trial}", techniques={"fault_injection": fault})
        assert (Path(result.run_dir) / "faults" / "kill.fired").exists(), fault
        figures["failures"] += 1
        if result.status != "FINISHED":
            figures["lost"] += 1
            continue
        got = _model_states(result.checkpoint)
        same = got.keys() == reference.keys() and all(
            torch.equal(got[k], reference[k]) for k in got
        )
        figures["recovered" if same else "lost"] += 1
        assert same, f"trial {trial} ({fault}): weights differ from the uninterrupted run"
    print(f"\nCHAOS worker-kill {figures}")
    assert figures["lost"] == 0
