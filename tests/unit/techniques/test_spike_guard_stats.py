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


# -- the gradient norm's scale floor, the slow-divergence trend -------------------------------
def _run_steps(guard, state, losses, grads=None):
    """Steps through both verdict hooks; per step, the larger action (0 none, 1 skip, ...)."""
    actions = []
    for i, loss in enumerate(losses):
        state._begin_step()
        state._update(loss=loss)
        if grads is not None:  # the pre-step norm the guard would measure from p.grad
            guard._model = None
            guard._pending = grads[i]
            found = guard._check(loss, grads[i])
            before = 1 if found is not None else 0
            if found is not None:
                guard._anomaly(state, found)
        else:
            before = int(guard.on_before_optimizer_step(state).action)
        state._update(step=state.step + 1)
        after = int(guard.on_step_end(state, {}).action)
        actions.append(max(before, after))
    return actions


def _noisy(n: int, seed: int, start: float = 3.0, end: float = 2.6, sigma: float = 0.07):
    """A healthy loss curve: a slow fall with multiplicative batch-to-batch noise."""
    import math
    import random

    rng = random.Random(seed)
    return [
        (start + (end - start) * i / max(1, n - 1)) * math.exp(sigma * rng.gauss(0.0, 1.0))
        for i in range(n)
    ]


def test_grad_z_has_a_scale_floor_a_narrow_window_does_not_call_a_hard_batch_a_spike():
    """Late in training the log norms are narrow (sigma ~0.1): a healthy hard batch 6-10x the
    median scored 12.4 and was skipped (bench warmup30, step 182). With the floor (0.25) only a
    norm > 20x the median can score 12; a x100 blow-up still does, on its step."""
    from orchestrator.recipe.techniques.stability import StabilityConfig as Cfg

    grads = [0.5 * (1.0 + 0.03 * ((i * 3) % 7 - 3)) for i in range(60)]
    for hard, flagged in ((8.0, False), (50.0, True)):
        guard = SpikeGuard(Cfg(loss_zscore=False, trend_threshold=None), global_batch=4)
        events: list = []
        state = _state(events)
        acts = _run_steps(guard, state, [3.0] * 61, grads=[*grads, 0.5 * hard])
        assert (acts[-1] > 0) is flagged, (hard, guard._scores)
    legacy = SpikeGuard(Cfg(grad_scale_floor=0.0, loss_zscore=False), global_batch=4)
    state = _state([])
    assert _run_steps(legacy, state, [3.0] * 61, grads=[*grads, 4.0])[-1] > 0  # the old false skip


def _trend_guard(**cfg):
    from orchestrator.recipe.techniques.stability import StabilityConfig as Cfg

    return SpikeGuard(Cfg(grad_norm_zscore=False, replay="off", **cfg), global_batch=4)


@pytest.mark.parametrize("seed", range(5))
def test_a_slow_divergence_is_caught_and_rolled_back_to_before_it_began(seed):
    """The loss rising x1 -> x2 over 50 steps never scores a z of 6 early (the window follows
    it); the trend's CUSUM asks for a rollback within 25 steps, to a step before its onset."""
    from orchestrator.techniques.base import Action

    guard, state = _trend_guard(), _state([])
    losses = _noisy(150, seed)
    at = 100
    diverging = [v * (1.0 + min(i - at, 50) / 50) if i >= at else v for i, v in enumerate(losses)]
    acts = _run_steps(guard, state, diverging)
    rollback = acts.index(int(Action.ROLLBACK))
    assert at <= rollback < at + 25 and not any(acts[:at])
    record = guard.rollbacks[0]
    assert record["reason"]["detector"] == "loss_trend"
    assert (
        at - 15 <= record["onset_step"] <= at + 5
        and record["to_step_at_most"] < record["onset_step"]
    )


@pytest.mark.parametrize("seed", range(5))
def test_healthy_noisy_curves_raise_no_trend(seed):
    """Falling, flat and noisy (with a 1.3x one-step bump) curves: no detection at all."""
    guard, state = _trend_guard(), _state([])
    flat = _noisy(200, seed, start=2.5, end=2.5)
    flat[120] *= 1.3  # a natural one-step bump (LISA switch, hard batch) is not a trend
    falling = _noisy(200, seed + 100)
    assert not any(_run_steps(guard, state, falling + flat))
    assert guard.anomalies == 0


def test_without_the_trend_detector_a_slow_divergence_is_missed_early():
    """The regression the trend detector fixes: the z-scores alone miss the first 25 steps."""
    guard, state = _trend_guard(trend_threshold=None), _state([])
    losses = _noisy(150, 0)
    diverging = [v * (1.0 + min(i - 100, 50) / 50) if i >= 100 else v for i, v in enumerate(losses)]
    assert not any(_run_steps(guard, state, diverging[:125]))


def test_the_trend_is_restored_with_the_history_and_restarted_by_a_regime_change():
    guard, state = _trend_guard(), _state([])
    _run_steps(guard, state, _noisy(60, 1))
    guard.trend_s, guard.trend_ref, guard.trend_onset = 3.5, [1.0, 0.05], [55, 220]
    guard.on_checkpoint_saved(state, 60, "ckpt-60")
    guard.trend_s = 15.0
    resumed = _trend_guard()
    resumed.load_state_dict(guard.state_dict())
    assert resumed.trend_s == 15.0 and resumed.trend_onset == [55, 220]
    resumed.on_rollback(state, 60)
    assert resumed.trend_s == 3.5 and resumed.trend_ref == [1.0, 0.05]
    state._begin_step()
    state.mark_regime_change(("loss",))
    state._update(loss=2.0)
    resumed.on_before_optimizer_step(state)
    assert resumed.trend_s == 0.0 and resumed.trend_ref is None


@pytest.mark.parametrize("factor", [3.0, 10.0, 100.0])
def test_spikes_of_x3_and_more_are_still_caught_on_their_step_and_nan_at_once(factor):
    guard, state = _trend_guard(), _state([])
    losses = _noisy(80, 2)
    losses[70] *= factor
    acts = _run_steps(guard, state, losses)
    assert acts.index(next(a for a in acts if a > 0)) == 70
    guard, state = _trend_guard(), _state([])
    acts = _run_steps(guard, state, [*_noisy(5, 3), float("nan")])
    assert acts == [0, 0, 0, 0, 0, 1]  # before min_history too


def test_checkpoint_retention_keeps_what_a_building_trend_may_roll_back_to():
    guard = _trend_guard()
    assert guard.rollback_floor(100) == 98
    guard.trend_onset = [80, 640]  # the CUSUM left 0 at step 80 and is still above 0
    assert guard.rollback_floor(100) == 78


def test_a_flat_deterministic_loss_does_not_make_a_tiny_uptick_a_trend():
    """Full-batch training can repeat a loss to the digit: no noise to scale by. A 0.05 %
    uptick is not a divergence (the trend's sigma has a floor of 0.1 % a step); the loss
    z-score, which calls any jump from a flat history a spike, is off here."""
    guard, state = _trend_guard(loss_zscore=False), _state([])
    assert not any(_run_steps(guard, state, [2.0] * 40 + [2.001] * 5))


# -- non-reproducible anomalies are counted per rank and host ------------------------------
def _transient(guard, state, host, monkeypatch):
    """One anomaly on this rank (world 1) that the re-run does not reproduce, on ``host``;
    the guard's decision."""
    from orchestrator.techniques import spike_guard
    from orchestrator.techniques.base import Replay

    monkeypatch.setattr(spike_guard.socket, "gethostname", lambda: host)
    guard._replay = lambda: Replay(first_loss=200.0, loss=2.0, grad_sq=1.0, seconds=0.01)
    state._begin_step()
    state._update(loss=200.0)
    found = {"detector": "loss_z", "value": 40.0}
    _, decision = guard._confirm(state, found)
    state._update(step=state.step + 1)
    return decision


def test_transient_faults_count_per_host_so_a_moved_rank_starts_again(monkeypatch):
    """max_transient faults on one rank's host stop the job naming the rank (the driver
    then restarts it without that node); restored from a checkpoint on another host, the
    same rank's count starts from zero, so one more fault there is retried, not a stop."""
    from orchestrator.techniques.base import Action

    guard, events = _guard(max_transient=2), []
    state = _state(events)
    for i in range(12):
        _step(guard, state, _healthy(i, 3.0))
    retried = _transient(guard, state, "gpu-7", monkeypatch)
    assert retried.action is Action.SKIP_STEP and retried.retry
    stop = _transient(guard, state, "gpu-7", monkeypatch)
    assert stop.action is Action.STOP and stop.bad_rank == 0 and "host gpu-7" in stop.message
    assert guard.transients == {"0@gpu-7": 2}

    moved = _guard(max_transient=2)
    moved.load_state_dict(guard.state_dict())  # the checkpoint the restart resumes from
    state = _state(events)
    for i in range(12):
        _step(moved, state, _healthy(i, 3.0))
    retried = _transient(moved, state, "gpu-8", monkeypatch)
    assert retried.action is Action.SKIP_STEP and retried.retry
    assert moved.transients == {"0@gpu-7": 2, "0@gpu-8": 1}
