"""MLflow's system metrics per rank (tracking/system.py) against a real sqlite store."""

from __future__ import annotations

import logging
import threading
import time

import mlflow

from orchestrator.tracking.runs import open_run
from orchestrator.tracking.system import SystemMetrics, node_id_of


def _monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


def test_node_ids_name_the_rank_and_the_machine() -> None:
    assert node_id_of(0) == "rank0"
    assert node_id_of(3, "1a2b3c4d") == "rank3-1a2b3c4d"


def test_samples_land_under_the_node_id_and_stop_leaves_no_thread(mlflow_uri: str) -> None:
    run_id = open_run(mlflow_uri, "system", "job")
    before = len(_monitor_threads())
    system = SystemMetrics.start(mlflow_uri, run_id, "rank1-cafe0123", interval_s=0.2)
    assert system is not None and system.node_id == "rank1-cafe0123"
    assert len(_monitor_threads()) == before + 1
    time.sleep(1.0)
    system.stop()
    system.stop()  # idempotent
    assert len(_monitor_threads()) == before
    client = mlflow.MlflowClient(mlflow_uri)
    keys = set(client.get_run(run_id).data.metrics)
    prefix = "system/rank1-cafe0123/"
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        assert prefix + name in keys, keys
    history = client.get_metric_history(run_id, prefix + "system_memory_usage_megabytes")
    assert len(history) >= 3 and all(m.value > 0 for m in history)
    assert not any(k.startswith("system/") and not k.startswith(prefix) for k in keys)


def test_a_run_shorter_than_the_interval_still_logs_its_sample(mlflow_uri: str) -> None:
    run_id = open_run(mlflow_uri, "system", "short")
    system = SystemMetrics.start(mlflow_uri, run_id, "rank0", interval_s=60.0)
    assert system is not None
    started = time.monotonic()
    system.stop()  # the thread wakes at once: no waiting out the interval
    assert time.monotonic() - started < 5.0
    metrics = mlflow.MlflowClient(mlflow_uri).get_run(run_id).data.metrics
    assert "system/rank0/cpu_utilization_percentage" in metrics


def test_mlflow_info_lines_stay_quiet_and_a_missing_run_never_raises(mlflow_uri: str) -> None:
    logging.getLogger("mlflow.system_metrics").setLevel(logging.NOTSET)
    system = SystemMetrics.start(mlflow_uri, "0" * 32, "rank0", interval_s=0.1)
    # "Started monitoring", "Skip logging GPU metrics" (no nvidia-ml-py) are INFO
    assert logging.getLogger("mlflow.system_metrics").getEffectiveLevel() == logging.WARNING
    assert system is not None
    time.sleep(0.3)  # its thread finds no such run and ends
    system.stop()
    assert not _monitor_threads()


def test_a_monitor_ends_by_itself_with_its_run_and_logs_nothing_after(mlflow_uri: str) -> None:
    run_id = open_run(mlflow_uri, "system", "ended")
    client = mlflow.MlflowClient(mlflow_uri)
    system = SystemMetrics.start(mlflow_uri, run_id, "rank0", interval_s=0.1)
    assert system is not None
    time.sleep(0.5)
    client.set_terminated(run_id, "KILLED")
    time.sleep(0.5)  # it sees the run ended at its next sample and stops
    assert not _monitor_threads()
    key = "system/rank0/cpu_utilization_percentage"
    logged = len(client.get_metric_history(run_id, key))
    system.stop()
    assert len(client.get_metric_history(run_id, key)) == logged
    assert client.get_run(run_id).info.status == "KILLED"
