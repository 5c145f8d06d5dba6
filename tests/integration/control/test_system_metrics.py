"""MLflow system metrics of a 2-worker job, per worker, in the real store (real local Ray,
gloo, DeepSpeed, MLflow sqlite), run through the controller."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
import ray

from conftest import tiny_recipe
from orchestrator.control import controller
from orchestrator.recipe.jobspec import JobSpec

pytestmark = pytest.mark.integration

_NODE = re.compile(r"^system/(rank\d+-[0-9a-f]{8})/")


def test_both_workers_log_cpu_and_memory_under_their_own_node_id(
    tmp_path: Path, ray_local: None
) -> None:
    recipe = tiny_recipe(
        tmp_path,
        schedule={"steps": 12, "micro_batch_size": 2},
        checkpoint={"every": 0, "at_end": False},
        resources={"workers": 2, "max_restarts": 0},
        tracking={"system_metrics_interval_s": 0.25},
    )
    result = controller.run_job(JobSpec.of("sysmetrics", recipe))
    assert result.status == "FINISHED", result.error
    client = mlflow.MlflowClient(recipe.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    keys = set(run.data.metrics)
    nodes = {m.group(1) for k in keys if (m := _NODE.match(k))}
    short = ray.get_runtime_context().get_node_id()[:8]  # one machine: both ranks on it
    assert nodes == {f"rank0-{short}", f"rank1-{short}"}, sorted(keys)
    for node in nodes:
        for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
            history = client.get_metric_history(result.run_id, f"system/{node}/{name}")
            assert history, (node, name)
        memory = client.get_metric_history(
            result.run_id, f"system/{node}/system_memory_usage_megabytes"
        )
        assert all(m.value > 0 for m in memory)
    assert not any(k.startswith("system/") and not _NODE.match(k) for k in keys)
