"""The lineage of segments in MLflow: the one place that writes lineage tags and counters.

A *segment* is one stretch of training with its own MLflow run:

* an automatic rollback (spike guard) inside a job: worker rank 0 opens a child run of the
  job run (:func:`open_segment_run`) and its metric sink switches to it;
* ``regimen resume RUN_ID``: a new job run (child of RUN_ID) continues the same run directory
  from its last committed checkpoint (tags: :func:`continuation_tags`);
* ``regimen rollback RUN_ID --to-step N``: the same from the checkpoint at or before N, with
  optional skipped batches and LR scale.

Every segment run carries ``regimen.parent_run_id``, ``regimen.segment``,
``regimen.restored_step``, ``regimen.reason`` (and for rollbacks the detector, value,
threshold, ``regimen.skipped_ranges``, ``regimen.lr_scale`` and, from the leading indicators,
``regimen.warned_steps_before`` / ``regimen.warned_by``, empty when none warned). The root
job run counts ``regimen.rollbacks``, ``regimen.resumes`` and ``regimen.manual_rollbacks``
(tags and metrics). Pre-rollback metrics stay in the run that logged them.

Both the worker (engine) and the driver (control, audit) use this module; it imports
nothing above the tracking layer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from orchestrator.tracking.client import mlflow_client
from orchestrator.tracking.runs import end_run, open_run

ROLE = "regimen.role"
SEGMENT_ROLE = "segment"  # ROLE of an automatic rollback's child run
PARENT_RUN_ID = "regimen.parent_run_id"
ROOT_RUN_ID = "regimen.root_run_id"
SEGMENT = "regimen.segment"
RESTORED_STEP = "regimen.restored_step"
FROM_STEP = "regimen.from_step"
REASON = "regimen.reason"
SKIPPED_RANGES = "regimen.skipped_ranges"
LR_SCALE = "regimen.lr_scale"
ABANDONED = "regimen.abandoned_checkpoints"
PARENT_WAS_STALE = "regimen.parent_was_stale"
RUN_DIR = "regimen.run_dir"
ROLLBACKS = "regimen.rollbacks"  # counters on the root job run (tag + metric)
RESUMES = "regimen.resumes"
MANUAL_ROLLBACKS = "regimen.manual_rollbacks"
Status = Literal["FINISHED", "FAILED", "KILLED"]
ContinuationKind = Literal["resume", "rollback"]
_MAX_JSON_TAG = 5000


def _tag(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_MAX_JSON_TAG]


def _blank(value: Any) -> str:
    return "" if value is None else str(value)


def set_counter(uri: str, run_id: str, key: str, value: int, step: int = 0) -> None:
    """Set the counter ``key`` of ``run_id`` to ``value`` (tag, and a metric point at ``step``)."""
    client = mlflow_client(uri)
    client.set_tag(run_id, key, str(value))
    client.log_metric(run_id, key, float(value), step=step)


def bump_counter(uri: str, run_id: str, key: str, step: int = 0) -> int:
    """Increment the counter ``key`` (tag + metric) on ``run_id``; the new value."""
    n = int(mlflow_client(uri).get_run(run_id).data.tags.get(key, "0")) + 1
    set_counter(uri, run_id, key, n, step=step)
    return n


def open_segment_run(
    uri: str,
    job_run_id: str,
    *,
    segment: int,
    kind: str,
    restored_step: int,
    payload: Mapping[str, Any],
    rollbacks: int,
) -> str:
    """Worker rank 0, after an in-place rollback: a child run of the job run for what follows.

    The segment before it (if still RUNNING) ends FINISHED, and the job run's
    ``regimen.rollbacks`` counter becomes ``rollbacks``. Returns the new run's id.
    """
    client = mlflow_client(uri)
    job = client.get_run(job_run_id)
    experiment = client.get_experiment(job.info.experiment_id).name
    record = payload.get("reason") or {}
    reason = record.get("reason", record)  # the spike guard nests the detector's finding
    tags = {
        ROLE: SEGMENT_ROLE,
        PARENT_RUN_ID: job_run_id,
        SEGMENT: str(segment),
        RESTORED_STEP: str(restored_step),
        FROM_STEP: str(payload.get("from_step")),
        REASON: _tag({"kind": kind, **reason}) if reason else kind,
        "regimen.onset_step": str(record.get("onset_step", "")),
        "regimen.detector": str(reason.get("detector", "")),
        "regimen.detector_value": str(reason.get("value", "")),
        "regimen.detector_threshold": str(reason.get("threshold", "")),
        SKIPPED_RANGES: _tag(payload.get("skipped", [])),
        "regimen.skip_ranges_total": _tag(payload.get("skip_ranges", [])),
        LR_SCALE: str(payload.get("lr_scale", 1.0)),
        RUN_DIR: job.data.tags.get(RUN_DIR, ""),
        # leading indicators: steps between the earliest warning and the spike onset ("" = none)
        "regimen.warned_steps_before": _blank(record.get("warned_steps_before")),
        "regimen.warned_by": _blank(record.get("warned_by")),
    }
    name = f"{job.info.run_name}-seg{segment}"
    run_id = open_run(uri, experiment, name, tags=tags, parent_run_id=job_run_id)
    for other in open_segments(uri, job_run_id):  # the segment before this one is done
        if other != run_id:
            end_run(uri, other, "FINISHED", reason=f"superseded by segment {segment} ({kind})")
    set_counter(uri, job_run_id, ROLLBACKS, rollbacks, step=int(payload.get("from_step", 0)))
    return run_id


def open_segments(uri: str, job_run_id: str) -> list[str]:
    """RUNNING child runs (segments) of ``job_run_id``."""
    client = mlflow_client(uri)
    job = client.get_run(job_run_id)
    runs = client.search_runs(
        [job.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{job_run_id}' and attributes.status = 'RUNNING'",
    )
    return [r.info.run_id for r in runs]


def end_segment(uri: str, run_id: str, status: Status, reason: str | None = None) -> None:
    """End one segment run (idempotent: a segment that already ended keeps its status)."""
    end_run(uri, run_id, status, reason=reason)


def close_segments(uri: str, job_run_id: str, status: Status, reason: str) -> None:
    """End every RUNNING segment of a job run (the job ended, or its worker died)."""
    for run_id in open_segments(uri, job_run_id):
        end_segment(uri, run_id, status, reason=reason)


def next_segment(parent_tags: Mapping[str, str]) -> int:
    """The segment number of a run that continues the run with tags ``parent_tags``."""
    return int(parent_tags.get(SEGMENT, "0")) + 1


def continuation_tags(
    parent_run_id: str,
    parent_tags: Mapping[str, str],
    *,
    kind: ContinuationKind,
    restored_step: int,
    parent_was_stale: bool,
    skipped_ranges: Sequence[Sequence[int]] | None = None,
    lr_scale: float | None = None,
    abandoned: Sequence[str] | None = None,
) -> dict[str, str]:
    """The lineage tags of a job run that continues ``parent_run_id`` (``regimen resume``,
    or ``regimen rollback`` with its skipped ranges, LR scale and abandoned checkpoints)."""
    tags = {
        PARENT_RUN_ID: parent_run_id,
        ROOT_RUN_ID: root_of(parent_run_id, parent_tags),
        SEGMENT: str(next_segment(parent_tags)),
        RESTORED_STEP: str(restored_step),
        REASON: kind,
        PARENT_WAS_STALE: str(parent_was_stale).lower(),
    }
    if kind == "rollback":
        tags |= {
            SKIPPED_RANGES: _tag([list(r) for r in skipped_ranges or []]),
            LR_SCALE: str(lr_scale if lr_scale is not None else 1.0),
            ABANDONED: _tag(list(abandoned or [])),
        }
    return tags


def root_of(run_id: str, tags: Mapping[str, str]) -> str:
    """The root job run of the lineage that ``run_id`` (with ``tags``) belongs to."""
    return tags.get(ROOT_RUN_ID, run_id)


def count_continuation(uri: str, root_run_id: str, kind: ContinuationKind, step: int) -> int:
    """Count a resume or manual rollback on the root job run; the new count."""
    key = RESUMES if kind == "resume" else MANUAL_ROLLBACKS
    return bump_counter(uri, root_run_id, key, step=step)
