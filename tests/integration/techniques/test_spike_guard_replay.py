"""Confirmation by replay (issue 17): before a rollback the spike guard re-runs the anomalous
step on the same batch from the same weights. A data-caused spike (a poisoned sample range)
reproduces: its samples are skipped and the run rolls back. A one-off fault (fires on the
step's first pass only) does not: the batch is retried, no rollback; repeated ones fail the
job naming the rank. In-process, world size 1, the tiny model."""

from __future__ import annotations

import math
import socket

import pytest

from conftest import tiny_recipe
from orchestrator.engine.loop import Trainer, WorkerContext
from orchestrator.engine.recovery import check_not_stopped
from orchestrator.errors import BadWorker, RollbackExhausted
from orchestrator.rundir import RunDir, Stopped

pytestmark = pytest.mark.integration

GUARD = {"window": 16, "min_history": 4, "patience": 1, "good_after": 1, "skip_batches": 2}
GUARD |= {"grad_norm_zscore": False, "replay": "on_rollback"}


def _run(tmp_path, name, faults, **guard):
    recipe = tiny_recipe(
        tmp_path,
        schedule={"steps": 12},
        checkpoint={"every": 2},
        stability={**GUARD, **guard},
        techniques={"fault_injection": {"spike_factor": 100.0, **faults}},
        deepspeed={"zero_optimization": {"stage": 1}},  # the quickstart's stage
    )
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / name))
    return trainer, trainer.run()


def _kinds(events, kind):
    return [e for e in events if e["kind"] == kind]


def test_a_poisoned_sample_range_is_confirmed_skipped_and_rolled_back(tmp_path, gloo_world):
    _, summary = _run(tmp_path, "poison", {"poison_samples": [36, 40]})  # step 9's batch
    (replay,) = _kinds(summary["events"], "replay")
    assert replay["at_step"] == 9 and replay["reproduced"] and replay["cause"] == "data"
    assert replay["replayed"]["loss"] == pytest.approx(replay["first"]["loss"], rel=1e-4)
    assert replay["seconds"] > 0
    (rollback,) = _kinds(summary["events"], "rollback")
    assert rollback["from_step"] == 10 and rollback["to_step"] == 8
    assert rollback["skipped"] == [[36, 44]] and rollback["reason"]["reason"]["replay"] == (
        "reproduced"
    )
    assert [e["at_step"] for e in _kinds(summary["events"], "spike")] == [9]  # skipped for good
    assert summary["steps"] == 12 and summary["rollbacks"] == 1
    assert math.isfinite(summary["final_loss"])


def test_a_one_off_fault_is_not_reproduced_and_retried_without_rollback(tmp_path, gloo_world):
    trainer, summary = _run(tmp_path, "transient", {"transient_spike_at_step": 9})
    events = summary["events"]
    (replay,) = _kinds(events, "replay")
    assert replay["at_step"] == 9 and not replay["reproduced"] and replay["cause"] == "transient"
    assert replay["decision"] == "retry" and replay["rank"] == 0
    assert replay["first"]["loss"] > 20 * replay["replayed"]["loss"]  # x100 on the first pass
    assert not _kinds(events, "rollback") and summary["rollbacks"] == 0
    assert summary["skipped_steps"] == 1 and summary["steps"] == 12
    # the batch of step 9 (cursor 36) ran again at step 10: one batch less was drawn
    assert trainer.loop.cursor == 11 * 4
    guard = next(t for t in trainer.techniques if t.name == "spike_guard")
    # counted for rank 0 on this host; checkpoints stay trusted
    assert guard.transients == {f"0@{socket.gethostname()}": 1} and guard.anomaly_steps == []


def test_repeated_transient_faults_fail_the_job_naming_the_rank(tmp_path, gloo_world):
    with pytest.raises(RollbackExhausted) as info:
        _run(tmp_path, "bad", {"transient_spike_at_step": 9}, max_transient=1)
    msg = str(info.value)
    assert "did not reproduce on replay" in msg and "rank 0" in msg
    assert "Restart the job without that node" in msg
    # the rank travels as a value, for the driver to restart the job without its node
    assert isinstance(info.value, BadWorker) and (info.value.rank, info.value.step) == (0, 10)
    rundir = RunDir(tmp_path / "bad")
    assert rundir.read_stopped() == Stopped(10, msg, bad_rank=0)  # stopped in step 9 (of 0..)
    with pytest.raises(BadWorker, match="did not reproduce"):  # a restart on the same nodes
        check_not_stopped(rundir)


def test_replay_off_rolls_back_a_one_off_fault_as_before(tmp_path, gloo_world):
    _, summary = _run(tmp_path, "off", {"transient_spike_at_step": 9}, replay="off")
    assert not _kinds(summary["events"], "replay") and summary["rollbacks"] == 1
