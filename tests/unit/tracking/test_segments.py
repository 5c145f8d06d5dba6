"""Segment lineage in MLflow (sqlite): segment runs, counters, the tags of a continuation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.tracking import segments
from orchestrator.tracking.runs import open_run


@pytest.fixture
def client(mlflow_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(mlflow_uri)


def _job(uri: str, tmp_path: Path) -> str:
    tags = {segments.RUN_DIR: str(tmp_path / "run")}
    return open_run(uri, "exp", "job", tags=tags, artifact_location=str(tmp_path / "art"))


SPIKE = {
    "from_step": 8,
    "skipped": [[32, 48]],
    "skip_ranges": [[0, 4], [32, 48]],
    "lr_scale": 0.5,
    "reason": {
        "onset_step": 7,
        "warned_steps_before": 2,
        "warned_by": "grad_norm_trend",
        "reason": {"detector": "zscore", "value": 9.5, "threshold": 6.0},
    },
}


def test_a_rollback_opens_the_next_segment_and_ends_the_one_before(
    mlflow_uri: str, client: Any, tmp_path: Path
) -> None:
    job = _job(mlflow_uri, tmp_path)
    first = segments.open_segment_run(
        mlflow_uri, job, segment=1, kind="rollback", restored_step=6, payload=SPIKE, rollbacks=1
    )
    tags = client.get_run(first).data.tags
    assert tags[segments.ROLE] == segments.SEGMENT_ROLE and tags["mlflow.parentRunId"] == job
    assert tags[segments.PARENT_RUN_ID] == job and tags[segments.SEGMENT] == "1"
    assert tags[segments.RESTORED_STEP] == "6" and tags[segments.FROM_STEP] == "8"
    assert tags[segments.SKIPPED_RANGES] == "[[32, 48]]" and tags[segments.LR_SCALE] == "0.5"
    assert tags["regimen.detector"] == "zscore" and tags["regimen.onset_step"] == "7"
    assert tags["regimen.warned_steps_before"] == "2" and tags[segments.RUN_DIR].endswith("run")
    assert client.get_run(first).info.run_name == "job-seg1"
    assert segments.open_segments(mlflow_uri, job) == [first]

    quiet = {"from_step": 12}  # no detector finding, no warning
    second = segments.open_segment_run(
        mlflow_uri, job, segment=2, kind="rollback", restored_step=10, payload=quiet, rollbacks=2
    )
    assert client.get_run(first).info.status == "FINISHED"
    assert "superseded by segment 2" in client.get_run(first).data.tags["regimen.end_reason"]
    tags = client.get_run(second).data.tags
    assert tags[segments.REASON] == "rollback" and tags["regimen.warned_by"] == ""
    assert segments.open_segments(mlflow_uri, job) == [second]
    root = client.get_run(job).data
    assert root.tags[segments.ROLLBACKS] == "2" and root.metrics[segments.ROLLBACKS] == 2.0

    segments.close_segments(mlflow_uri, job, "KILLED", "worker died")
    assert client.get_run(second).info.status == "KILLED"
    assert segments.open_segments(mlflow_uri, job) == []
    assert client.get_run(job).info.status == "RUNNING"  # the job run is the driver's


def test_continuation_tags_follow_the_lineage() -> None:
    first = segments.continuation_tags(
        "job", {}, kind="resume", restored_step=10, parent_was_stale=True
    )
    assert first == {
        segments.PARENT_RUN_ID: "job",
        segments.ROOT_RUN_ID: "job",
        segments.SEGMENT: "1",
        segments.RESTORED_STEP: "10",
        segments.REASON: "resume",
        segments.PARENT_WAS_STALE: "true",
    }
    second = segments.continuation_tags(
        "res1",
        first,
        kind="rollback",
        restored_step=4,
        parent_was_stale=False,
        skipped_ranges=[[16, 32]],
        lr_scale=None,
        abandoned=["/r/abandoned/rollback-2/step-8"],
    )
    assert second[segments.ROOT_RUN_ID] == "job" and second[segments.SEGMENT] == "2"
    assert second[segments.PARENT_RUN_ID] == "res1" and second[segments.REASON] == "rollback"
    assert second[segments.SKIPPED_RANGES] == "[[16, 32]]" and second[segments.LR_SCALE] == "1.0"
    assert second[segments.ABANDONED] == '["/r/abandoned/rollback-2/step-8"]'
    assert segments.next_segment(second) == 3


def test_continuations_are_counted_on_the_root(
    mlflow_uri: str, client: Any, tmp_path: Path
) -> None:
    job = _job(mlflow_uri, tmp_path)
    assert segments.count_continuation(mlflow_uri, job, "resume", step=4) == 1
    assert segments.count_continuation(mlflow_uri, job, "resume", step=9) == 2
    assert segments.count_continuation(mlflow_uri, job, "rollback", step=6) == 1
    data = client.get_run(job).data
    assert data.tags[segments.RESUMES] == "2" and data.tags[segments.MANUAL_ROLLBACKS] == "1"
    history = client.get_metric_history(job, segments.RESUMES)
    assert sorted((m.step, m.value) for m in history) == [(4, 1.0), (9, 2.0)]
