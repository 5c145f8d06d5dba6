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
