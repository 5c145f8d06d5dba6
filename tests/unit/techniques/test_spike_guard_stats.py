"""Spike guard statistics without an engine: the robust z-score and the trusted rollback
bound. The runs through the Trainer (detection, skip, rollback, stop) are in
tests/integration/techniques/test_spike_guard_engine.py."""

from __future__ import annotations

import pytest

from orchestrator.techniques.spike_guard import SpikeGuard, StabilityConfig, robust_z


def test_robust_z_is_one_sided_and_median_based():
    hist = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95]
    assert robust_z(1.0, hist) == pytest.approx(0.0, abs=1e-9)
    assert robust_z(10.0, hist) > 50 and robust_z(0.1, hist) < 0
    assert robust_z(1.0001, [2.0] * 8) < 0 and robust_z(3.0, [2.0] * 8) > 1e3  # flat history


def test_trusted_bound_skips_checkpoints_near_earlier_anomalies():
    guard = SpikeGuard(StabilityConfig(good_after=2), global_batch=4)
    assert guard.trusted_bound(10) == 8
    guard.anomaly_steps = [9]  # a skipped anomaly at step 9: checkpoint 8 is not trusted
    assert guard.trusted_bound(10) == 7


# -- the detector history follows the model --------------------------------------------------
def _guard(**cfg):
    from orchestrator.recipe.techniques.stability import StabilityConfig as Cfg

    return SpikeGuard(Cfg(grad_norm_zscore=False, min_history=10, **cfg), global_batch=4)


def _state(events):
    from conftest import TINY_RECIPE
    from orchestrator.recipe.loader import load_recipe_data
    from orchestrator.techniques.base import TrainState

    recipe = load_recipe_data(dict(TINY_RECIPE), "<test>")
    return TrainState(recipe, 100, on_event=lambda kind, payload: events.append((kind, payload)))


def _step(guard, state, loss) -> bool:
    """One step through the guard's verdict hooks; whether it was flagged."""
    state._begin_step()
    state._update(loss=loss)
    flagged = guard.on_before_optimizer_step(state).action > 0
    state._update(step=state.step + 1)
    guard.on_step_end(state, {})
    return flagged


def _healthy(i: int, level: float) -> float:
    return level + 0.02 * ((i * 7) % 5 - 2)


def test_rollback_restores_the_checkpoints_statistics_and_stays_armed():
    """Restore, not reset: after rolling back to checkpoint 30 the healthy steps that follow
    (at the loss level of step 30) pass although the abandoned timeline's losses were lower,
    and a spike two steps later is still caught (a reset guard would be blind for 10 steps)."""
    events: list = []
    guard, state = _guard(), _state(events)
    assert not any(_step(guard, state, _healthy(i, 3.0)) for i in range(30))
    guard.on_checkpoint_saved(state, 30, "ckpt-30")
    assert not any(_step(guard, state, _healthy(i, 2.0)) for i in range(40))  # loss fell
    state._update(step=30)
    guard.on_rollback(state, 30)
    assert ("detector_restored", {"to_step": 30, "loss_history": 30, "grad_history": 0}) in events
    assert not _step(guard, state, _healthy(1, 3.0))  # stale statistics would flag this
    assert _step(guard, state, 9.0)


def test_rollback_without_kept_statistics_resets_and_rearms():
    events: list = []
    guard, state = _guard(), _state(events)
    for i in range(20):
        _step(guard, state, _healthy(i, 3.0))
    guard.on_rollback(state, 10)  # no snapshot of step 10
    assert guard.loss_hist == [] and events[-1][0] == "detector_reset"
    assert not any(_step(guard, state, _healthy(i, 1.0)) for i in range(10))
    assert _step(guard, state, 9.0)  # armed again after min_history healthy steps


def test_snapshots_travel_in_the_state_dict_and_are_cut_at_the_rollback_target():
    """A resume from checkpoint 20 can still roll back to checkpoint 10 with its statistics."""
    events: list = []
    guard, state = _guard(), _state(events)
    for step in (10, 20):
        for i in range(10):
            _step(guard, state, _healthy(i, 30.0 / step))
        guard.on_checkpoint_saved(state, step, f"ckpt-{step}")
    resumed = _guard()
    resumed.load_state_dict(guard.state_dict())
    resumed.on_checkpoint_loaded(state, 20)
    assert sorted(resumed.snapshots) == [10, 20]
    resumed.on_rollback(state, 10)
    assert resumed.loss_hist == guard.snapshots[10]["loss_hist"]
    assert sorted(resumed.snapshots) == [10]


def test_a_regime_change_restarts_only_the_signals_it_names():
    events: list = []
    guard, state = _guard(), _state(events)
    guard.loss_hist, guard.grad_hist = [1.0] * 12, [0.5] * 12
    state._begin_step()
    state.mark_regime_change(("grad_norm",))  # a LISA switch: other layers train
    state._update(loss=1.0)
    guard.on_before_optimizer_step(state)
    assert guard.loss_hist == [1.0] * 12 and guard.grad_hist == []
    assert events[-1] == ("detector_reset", {"reason": "regime change", "signals": ["grad_norm"]})
    with pytest.raises(ValueError, match="unknown signals"):
        state.mark_regime_change(("lr",))


def test_grad_z_is_scored_on_log_norms():
    """A healthy gradient norm 5x the median is not a spike; a 1000x blow-up is."""
    hist = [0.5 * (1.0 + 0.1 * ((i * 3) % 7 - 3)) for i in range(40)]
    from orchestrator.techniques.spike_guard import _log

    logs = [_log(g) for g in hist]
    assert robust_z(_log(2.5), logs) < 12.0 < robust_z(_log(500.0), logs)
