"""Spike guard in-process (world size 1): detection, skip, rollback with exact skip ranges, stop
(Trainer runs through DeepSpeed; the statistics alone are in
tests/unit/techniques/test_spike_guard_stats.py)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_recipe
from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
from orchestrator.errors import RollbackExhausted

pytestmark = pytest.mark.integration

GUARD = {"window": 16, "min_history": 4, "patience": 1, "good_after": 1, "skip_batches": 2}
GUARD |= {"grad_norm_zscore": False}  # a 4-step grad-norm history is too noisy for 6 sigma


def _recipe(tmp_path, steps=12, stability=None, faults=None, **extra):
    sections = {"schedule": {"steps": steps}, "checkpoint": {"every": 2}, **extra}
    if stability is not None:
        sections["stability"] = stability
    if faults:
        sections["techniques"] = {"fault_injection": faults}
    return tiny_recipe(tmp_path, **sections)


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.built.engine.module.state_dict().items()}


def _kinds(summary, kind):
    return [e for e in summary["events"] if e["kind"] == kind]


def test_spike_rolls_back_skips_exact_window_and_matches_clean_run(tmp_path, gloo_world):
    recipe = _recipe(tmp_path, stability=GUARD, faults={"spike_at_step": 9, "spike_factor": 100.0})
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "spiky"))
    summary = trainer.run()
    (spike,) = _kinds(summary, "spike")
    assert spike["at_step"] == 9 and spike["detector"] == "loss_z" and spike["value"] > 6
    (rollback,) = _kinds(summary, "rollback")
    # checkpoint 8 has one healthy step after it (good_after=1); onset cursor = 9 steps x 4
    assert rollback["from_step"] == 10 and rollback["to_step"] == 8
    assert rollback["skipped"] == [[36, 44]] and trainer.loop.skip_ranges == [(36, 44)]
    assert _kinds(summary, "skip_data") == [_kinds(summary, "skip_data")[0]]
    assert (
        _kinds(summary, "skip_data")[0]["start"] == 36
        and _kinds(summary, "skip_data")[0]["end"] == 44
    )
    assert (
        summary["steps"] == 12
        and summary["rollbacks"] == 1
        and math.isfinite(summary["final_loss"])
    )
    guard = next(t for t in trainer.techniques if t.name == "spike_guard")
    assert len(guard.state_dict()["rollbacks"]) == 1  # counters survived the restore

    # The same training with the window skipped from the start and no fault: identical weights.
    clean = Trainer(_recipe(tmp_path, stability=GUARD), WorkerContext(run_dir=tmp_path / "clean"))
    build = clean._build

    def build_with_skip() -> None:
        build()
        clean.loop.skip_ranges = [(36, 44)]

    clean._build = build_with_skip  # type: ignore[method-assign]
    clean.run()
    a, b = _weights(trainer), _weights(clean)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_is_skipped_without_update_below_patience(tmp_path, gloo_world):
    cfg = {**GUARD, "patience": 2}
    recipe = _recipe(tmp_path, steps=6, stability=cfg, faults={"nan_at_step": 3})
    before: dict[str, torch.Tensor] = {}

    class Spy(StepHook):
        def before_step(self, trainer: Trainer) -> None:
            if trainer.state.step == 3:
                before.update(_weights(trainer))
                opt = trainer.built.optimizer
                moments = [s["exp_avg_sq"].flatten() for s in opt.state.values()]
                before["_moments"] = torch.cat(moments)

        def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            if trainer.state.step == 4:
                after = _weights(trainer)
                assert all(torch.equal(before[k], after[k]) for k in after), (
                    "a NaN step changed weights"
                )
                opt = trainer.built.optimizer
                now = torch.cat([s["exp_avg_sq"].flatten() for s in opt.state.values()])
                assert torch.equal(before["_moments"], now), "a skipped step changed the moments"

    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "nan"), step_hooks=[Spy()])
    summary = trainer.run()
    (spike,) = _kinds(summary, "spike")
    assert spike["detector"] == "nan" and spike["at_step"] == 3
    assert summary["skipped_steps"] == 1 and summary["rollbacks"] == 0
    assert math.isfinite(summary["final_loss"]) and before


def test_rollback_budget_exhausted_stops_with_steps_and_actions(tmp_path, gloo_world):
    cfg = {**GUARD, "max_rollbacks": 1, "lr_scale": 0.5, "cooldown_steps": 2, "reset_moments": True}
    faults = {"spike_at_step": 6, "spike_steps": 1, "spike_factor": 100.0, "nan_at_step": 9}
    trainer = Trainer(
        _recipe(tmp_path, stability=cfg, faults=faults), WorkerContext(run_dir=tmp_path / "x")
    )
    with pytest.raises(RollbackExhausted) as info:
        trainer.run()
    msg = str(info.value)
    assert "max_rollbacks=1" in msg and "step 9" in msg and "spike at step 6" in msg
    assert "rolled back to step 4" in msg and "lr x0.5" in msg and "moments reset" in msg
    assert "skipped samples [24, 32)" in msg
    kinds = [e["kind"] for e in trainer.events]
    assert "cooldown_end" in kinds  # lr_scale 0.5 for 2 steps after the rollback, then 1.0


def test_no_spike_no_effect(tmp_path, gloo_world):
    guarded = Trainer(
        _recipe(tmp_path, steps=6, stability=GUARD), WorkerContext(run_dir=tmp_path / "g")
    )
    s = guarded.run()
    assert s["rollbacks"] == 0 and s["skipped_steps"] == 0 and not _kinds(s, "spike")


# -- leading indicators --------------------------------------------------------------------------
INDICATORS = {**GUARD, "indicators_every": 1}


def _indicator_series(tmp_path, stage: int, steps: int = 4) -> list[dict[str, float]]:
    recipe = _recipe(
        tmp_path, steps=steps, stability=INDICATORS,
        deepspeed={"zero_optimization": {"stage": stage}},
    )  # fmt: skip
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / f"z{stage}"))
    trainer._build()
    return [trainer.run_step() for _ in range(steps)]


def test_indicators_read_torch_and_deepspeed_zero_state_alike(tmp_path, gloo_world):
    """Update RMS from torch AdamW state (ZeRO-0) equals the one from DeepSpeed's flat fp32
    partitions (ZeRO-1, ZeRO-2); TEV and attention entropy are logged per step."""
    z0, z1, z2 = (_indicator_series(tmp_path, s) for s in (0, 1, 2))
    # first step: v_hat == g^2 exactly, so g^2 / v_hat == 1 wherever g != 0
    assert z0[0]["indicator/update_rms_max"] == pytest.approx(1.0, abs=1e-6)
    layers = [k for k in z0[1] if k.startswith("indicator/update_rms/")]
    assert "indicator/update_rms/model.layers.0" in layers and len(layers) >= 4
    for a, b, c in zip(z0, z1, z2, strict=True):
        for key in [*layers, "indicator/update_rms_max", "indicator/tev_mean"]:
            assert a[key] == pytest.approx(b[key], rel=1e-5) == pytest.approx(c[key], rel=1e-5)
    ent = z0[0]["indicator/attn_entropy_min"]
    assert 0.0 < ent <= math.log(32) and "indicator/attn_entropy/model.layers.1.self_attn" in z0[0]
    assert z0[0]["indicator/tev_mean"] > 0 and z0[0]["indicator/cost_s"] > 0


def test_indicator_warning_before_spike_recorded_in_rollback_lineage(tmp_path, gloo_world):
    """A gradient blow-up at step 6 (no clipping) lifts the update RMS: warning; the loss spike
    at step 8 rolls back, and the segment run in MLflow carries warned_steps_before == 2."""
    import mlflow

    from orchestrator.tracking.runs import open_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = open_run(uri, "ind", "job")
    stability = {**INDICATORS, "update_rms_max": 2.0}
    faults = {"grad_blowup_at_step": 6, "grad_factor": 1e4, "spike_at_step": 8}
    recipe = _recipe(tmp_path, stability=stability, faults=faults, optimizer={"grad_clip": 0.0})
    ctx = WorkerContext(run_dir=tmp_path / "lead", tracking_uri=uri, run_id=run_id)
    summary = Trainer(recipe, ctx).run()
    warnings = _kinds(summary, "indicator_warning")
    assert [w["at_step"] for w in warnings] == [6] and warnings[0]["indicator"] == "update_rms"
    (rollback,) = _kinds(summary, "rollback")
    assert rollback["reason"]["warned_steps_before"] == 2
    assert rollback["reason"]["warned_by"] == "update_rms"
    client = mlflow.MlflowClient(uri)
    (seg,) = client.search_runs(
        [client.get_run(run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
    )
    assert seg.data.tags["regimen.warned_steps_before"] == "2"
    assert seg.data.tags["regimen.warned_by"] == "update_rms"
    events = (tmp_path / "lead" / "spool").glob("*.events.jsonl")
    assert any("indicator_warning" in p.read_text() for p in events)


def test_indicator_detect_mode_turns_a_warning_into_an_anomaly(tmp_path, gloo_world):
    stability = {**INDICATORS, "update_rms_max": 2.0, "indicator_action": "detect"}
    faults = {"grad_blowup_at_step": 6, "grad_factor": 1e4}
    recipe = _recipe(tmp_path, stability=stability, faults=faults, optimizer={"grad_clip": 0.0})
    summary = Trainer(recipe, WorkerContext(run_dir=tmp_path / "det")).run()
    (spike,) = _kinds(summary, "spike")
    assert spike["detector"] == "indicator_update_rms" and spike["at_step"] == 6
    (rollback,) = _kinds(summary, "rollback")
    assert rollback["to_step"] == 4 and summary["steps"] == 12


def test_async_checkpoints_roll_back_to_the_same_weights_as_sync(tmp_path, gloo_world):
    """checkpoint.async: rollback waits for the in-flight write and restores the same state."""
    faults = {"spike_at_step": 9, "spike_factor": 100.0}
    runs = {}
    for mode in (False, True):
        recipe = _recipe(
            tmp_path, stability=GUARD, faults=faults, checkpoint={"every": 2, "async": mode}
        )
        trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / f"async-{mode}"))
        summary = trainer.run()
        (rollback,) = _kinds(summary, "rollback")
        assert rollback["to_step"] == 8 and summary["steps"] == 12
        modes = {e.get("mode") for e in _kinds(summary, "checkpoint")}
        assert modes == ({"async", None} if mode else {None})  # the final save is synchronous
        assert trainer.store.pending is None
        runs[mode] = _weights(trainer)
    assert all(torch.equal(runs[False][k], runs[True][k]) for k in runs[False])


def test_a_slow_divergence_is_rolled_back_by_the_trend_detector(tmp_path, gloo_world):
    """The loss factor rising x1 -> x3 over 20 steps from step 20: the z-scores see each step
    close to the last; the trend's CUSUM asks for a rollback at once (no skip first), to a
    checkpoint before its onset, and the run finishes (the fault holds until a rollback)."""
    cfg = {**GUARD, "window": 32, "min_history": 8, "patience": 2}
    faults = {"diverge_at_step": 20, "diverge_steps": 20, "diverge_factor": 3.0}
    recipe = _recipe(tmp_path, steps=36, stability=cfg, faults=faults)
    summary = Trainer(recipe, WorkerContext(run_dir=tmp_path / "diverge")).run()
    (rollback,) = _kinds(summary, "rollback")
    assert rollback["reason"]["reason"]["detector"] == "loss_trend"
    onset = rollback["reason"]["onset_step"]
    assert 14 <= onset <= 24 and rollback["to_step"] < onset <= rollback["from_step"] - 1
    assert rollback["from_step"] <= 20 + 15
    trend = [e for e in _kinds(summary, "spike") if e["detector"] == "loss_trend"]
    assert len(trend) == 1 and trend[0]["onset_step"] == onset
    assert summary["steps"] == 36 and math.isfinite(summary["final_loss"])
