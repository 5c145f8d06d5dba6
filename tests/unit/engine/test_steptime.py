"""The step-time split: the clock (CPU and, with fake events, CUDA) and a real run's metrics."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest

from conftest import tiny_recipe
from orchestrator.engine.steptime import StepClock

SPLIT = ("time/data_s", "time/forward_s", "time/backward_s", "time/optimizer_s", "time/step_s")


class FakeEvent:
    """A CUDA event on a fake GPU clock that runs 10x slower than the host."""

    gpu_now = 0.0
    syncs = 0

    def record(self) -> None:
        FakeEvent.gpu_now += 10.0  # ms
        self.at = FakeEvent.gpu_now

    def elapsed_time(self, other: FakeEvent) -> float:
        return other.at - self.at

    def synchronize(self) -> None:
        FakeEvent.syncs += 1


def test_cpu_laps_are_wall_clock_and_sum_within_the_step() -> None:
    clock = StepClock()
    clock.begin("cpu")
    for phase in ("data", "forward", "backward"):
        clock.mark()
        time.sleep(0.01)
        clock.lap(phase)
    clock.mark()
    time.sleep(0.01)
    clock.lap("optimizer")
    out = clock.metrics()
    assert set(out) == set(SPLIT)
    assert all(out[k] >= 0.009 for k in SPLIT)
    assert sum(out[k] for k in SPLIT[:4]) <= out["time/step_s"]


def test_on_cuda_phases_are_event_time_resolved_with_one_wait() -> None:
    made: list[FakeEvent] = []

    def factory() -> FakeEvent:
        made.append(FakeEvent())
        return made[-1]

    clock = StepClock(event_factory=factory)
    FakeEvent.syncs = 0
    for _ in range(2):  # the pool is reused: no new events on the second step
        clock.begin("cuda")
        for _micro in range(2):  # grad accumulation 2: phases sum over micro-batches
            clock.mark()
            clock.lap("data")
            clock.lap("forward")
            clock.lap("backward")
        clock.mark()
        clock.lap("optimizer")
        assert FakeEvent.syncs == 0  # marking never waits for the GPU
        out = clock.metrics()
        assert FakeEvent.syncs == 1
        FakeEvent.syncs = 0
    assert len(made) == 11  # begin, 4 points a micro-batch x 2, the optimizer mark and lap
    assert out["time/forward_s"] == pytest.approx(0.02)  # 2 laps of one 10 ms event gap
    assert out["time/backward_s"] == pytest.approx(0.02)
    assert out["time/optimizer_s"] == pytest.approx(0.01)
    assert out["time/step_s"] == pytest.approx(0.1)  # first to last of 11 events, 10 ms apart
    assert 0 <= out["time/data_s"] < 0.01  # the host's time, not the fake GPU's


def test_a_run_logs_the_split_at_its_logged_steps_and_system_metrics_per_rank(
    tmp_path: Path, gloo_world: None, mlflow_uri: str
) -> None:
    from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
    from orchestrator.tracking.runs import open_run

    seen: dict[int, dict[str, float]] = {}

    class Keep(StepHook):
        def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            seen[trainer.state.step] = metrics

    run_id = open_run(mlflow_uri, "split", "job")
    recipe = tiny_recipe(
        tmp_path,
        schedule={"steps": 6, "log_every": 2, "grad_accumulation": 2},
        tracking={"system_metrics_interval_s": 0.2},
    )
    ctx = WorkerContext(
        run_dir=tmp_path / "run", tracking_uri=mlflow_uri, run_id=run_id, node_id="rank0-test"
    )
    Trainer(recipe, ctx, step_hooks=[Keep()]).run()
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]
    assert {s for s, m in seen.items() if "time/step_s" in m} == {2, 4, 6}  # logged steps only
    client = mlflow.MlflowClient(mlflow_uri)
    history = {k: client.get_metric_history(run_id, k) for k in SPLIT}
    for key, points in history.items():
        assert [p.step for p in points] == [2, 4, 6], key
        assert all(p.value > 0 for p in points), key
    for i in range(3):
        phases = sum(history[k][i].value for k in SPLIT[1:4])
        assert phases <= history["time/step_s"][i].value
    metrics = client.get_run(run_id).data.metrics
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        assert f"system/rank0-test/{name}" in metrics


def test_system_metrics_off_and_a_failed_run_leaves_no_monitor(
    tmp_path: Path, gloo_world: None, mlflow_uri: str
) -> None:
    from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
    from orchestrator.tracking.runs import open_run

    class Boom(StepHook):
        def before_step(self, trainer: Trainer) -> None:
            if trainer.state.step == 2:
                raise RuntimeError("boom")

    run_id = open_run(mlflow_uri, "split", "fails")
    recipe = tiny_recipe(
        tmp_path, schedule={"steps": 4}, tracking={"system_metrics_interval_s": 0.1}
    )
    ctx = WorkerContext(run_dir=tmp_path / "run", tracking_uri=mlflow_uri, run_id=run_id)
    with pytest.raises(RuntimeError, match="boom"):
        Trainer(recipe, ctx, step_hooks=[Boom()]).run()
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]
    assert "system/rank0/cpu_utilization_percentage" in (
        mlflow.MlflowClient(mlflow_uri).get_run(run_id).data.metrics
    )

    off_id = open_run(mlflow_uri, "split", "off")
    off: Any = tiny_recipe(tmp_path, schedule={"steps": 2}, tracking={"system_metrics": False})
    off_ctx = WorkerContext(run_dir=tmp_path / "off", tracking_uri=mlflow_uri, run_id=off_id)
    Trainer(off, off_ctx).run()
    keys = mlflow.MlflowClient(mlflow_uri).get_run(off_id).data.metrics
    assert "loss" in keys and not any(k.startswith("system/") for k in keys)
