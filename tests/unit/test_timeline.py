"""Start-up marks: phases from their marks, the critical path adds up to the span."""

from __future__ import annotations

import time

import pytest

from orchestrator.timeline import (
    PHASES,
    PROCESS_START,
    Timeline,
    critical_path,
    phase_seconds,
    process_start_time,
)


def test_phases_are_measured_between_their_marks() -> None:
    line = Timeline({PROCESS_START: 100.0})
    line.mark("driver.recipe", at=100.4)
    line.mark("ray.begin", at=100.5)
    line.mark("store.begin", at=100.5)
    line.mark("store.ready", at=102.0)
    line.mark("ray.ready", at=104.0)
    got = phase_seconds(line.marks)
    assert got == {"driver_start": 0.4, "ray_init": 3.5, "mlflow_store": 1.5}
    # overlapped phases add up to more than the span; the critical path to exactly the span
    path = critical_path(line.marks)
    assert path[0][0] == PROCESS_START and path[-1][0] == "ray.ready"
    assert sum(s for _, s in path) == pytest.approx(4.0)
    assert list(line.to_dict()) == [name for name, _ in path]  # time order


def test_a_mark_is_now_and_marks_of_another_process_join() -> None:
    line = Timeline()
    before = time.time()
    at = line.mark("run.begin")
    assert before <= at <= time.time()
    line.update({"worker.entry": at + 1.0})
    assert phase_seconds({**line.marks, "workers.begin": at}) == {"worker_start": 1.0}


def test_every_phase_has_its_own_label_and_this_process_a_start() -> None:
    labels = [label for label, _, _ in PHASES]
    assert len(set(labels)) == len(labels)
    started = process_start_time()
    assert started is not None and started <= time.time()
