"""A job's result comes back from rank 0 as a value; summary.json is only the crash record."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from conftest import tiny_recipe
from orchestrator.control import controller
from orchestrator.recipe.jobspec import JobSpec
from orchestrator.rundir import RunDir

pytestmark = pytest.mark.integration


def test_the_result_is_complete_without_the_record_on_disk(
    tmp_path: Path, ray_local: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RunDir, "read_summary", lambda self: None)
    recipe = tiny_recipe(tmp_path, schedule={"steps": 4, "micro_batch_size": 2})
    result = controller.run_job(JobSpec.of("value", recipe))
    assert result.status == "FINISHED", result.error
    assert result.steps == 4
    assert result.final_loss is not None and result.checkpoint is not None
    assert Path(result.checkpoint).is_dir()
    run = mlflow.MlflowClient(recipe.tracking.uri).get_run(result.run_id)
    assert run.data.metrics["steps"] == 4.0  # what the driver logged came from the value
