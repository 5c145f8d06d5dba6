"""Resume and manual rollback of a job from MLflow, and the lineage of segments.

A *segment* is one stretch of training with its own MLflow run:

* an automatic rollback (spike guard) inside a job: rank 0 opens a child run of the job run
  (:func:`open_segment_run`) and its metric sink switches to it;
* ``regimen resume RUN_ID``: a new job run (child of RUN_ID) continues the same run directory
  from its last committed checkpoint;
* ``regimen rollback RUN_ID --to-step N``: the same from the checkpoint at or before N, with
  optional skipped batches and LR scale. Checkpoints after it are moved to
  ``<run_dir>/abandoned/`` (never deleted) so that nothing resumes into the old timeline.

Every segment run carries ``regimen.parent_run_id``, ``regimen.segment``,
``regimen.restored_step``, ``regimen.reason`` (and for rollbacks the detector, value,
threshold, ``regimen.skipped_ranges``, ``regimen.lr_scale`` and, from the leading indicators,
``regimen.warned_steps_before`` / ``regimen.warned_by``, empty when none warned). The root
job run counts ``regimen.rollbacks`` and ``regimen.resumes`` (tags and metrics). Pre-rollback
metrics stay in the run that logged them. A stale RUNNING run (its driver was killed) is ended
KILLED when resume touches it, with its open segment runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.rundir import RunDir, Segment


def _client(uri: str) -> Any:
    from orchestrator.tracking.runs import _client as shared

    return shared(uri)


def _tag(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:5000]


def _blank(value: Any) -> str:
    return "" if value is None else str(value)


def _count(client: Any, run_id: str, key: str, step: int = 0) -> int:
    """Increment the counter ``key`` (tag + metric) on ``run_id``; the new value."""
    run = client.get_run(run_id)
    n = int(run.data.tags.get(key, "0")) + 1
    client.set_tag(run_id, key, str(n))
    client.log_metric(run_id, key, float(n), step=step)
    return n


def open_segment_run(
    uri: str,
    job_run_id: str,
    *,
    segment: int,
    kind: str,
    restored_step: int,
    payload: dict[str, Any],
    rollbacks: int,
) -> str:
    """Worker rank 0, after an in-place rollback: a child run of the job run for what follows."""
    from orchestrator.tracking.runs import end_run, open_run

    client = _client(uri)
    job = client.get_run(job_run_id)
    experiment = client.get_experiment(job.info.experiment_id).name
    record = payload.get("reason") or {}
    reason = record.get("reason", record)  # the spike guard nests the detector's finding
    tags = {
        "regimen.role": "segment",
        "regimen.parent_run_id": job_run_id,
        "regimen.segment": str(segment),
        "regimen.restored_step": str(restored_step),
        "regimen.from_step": str(payload.get("from_step")),
        "regimen.reason": _tag({"kind": kind, **reason}) if reason else kind,
        "regimen.onset_step": str(record.get("onset_step", "")),
        "regimen.detector": str(reason.get("detector", "")),
        "regimen.detector_value": str(reason.get("value", "")),
        "regimen.detector_threshold": str(reason.get("threshold", "")),
        "regimen.skipped_ranges": _tag(payload.get("skipped", [])),
        "regimen.skip_ranges_total": _tag(payload.get("skip_ranges", [])),
        "regimen.lr_scale": str(payload.get("lr_scale", 1.0)),
        "regimen.run_dir": job.data.tags.get("regimen.run_dir", ""),
        # leading indicators: steps between the earliest warning and the spike onset ("" = none)
        "regimen.warned_steps_before": _blank(record.get("warned_steps_before")),
        "regimen.warned_by": _blank(record.get("warned_by")),
    }
    name = f"{job.info.run_name}-seg{segment}"
    run_id = open_run(uri, experiment, name, tags=tags, parent_run_id=job_run_id)
    for other in open_segments(uri, job_run_id):  # the segment before this one is done
        if other != run_id:
            end_run(uri, other, "FINISHED", reason=f"superseded by segment {segment} ({kind})")
    client.set_tag(job_run_id, "regimen.rollbacks", str(rollbacks))
    client.log_metric(
        job_run_id, "regimen.rollbacks", float(rollbacks), step=int(payload.get("from_step", 0))
    )
    return run_id


def open_segments(uri: str, job_run_id: str) -> list[str]:
    """RUNNING child runs (segments) of ``job_run_id``."""
    client = _client(uri)
    job = client.get_run(job_run_id)
    runs = client.search_runs(
        [job.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{job_run_id}' and attributes.status = 'RUNNING'",
    )
    return [r.info.run_id for r in runs]


def close_segments(uri: str, job_run_id: str, status: str, reason: str) -> None:
    """End every RUNNING segment of a job run (the job ended, or its worker died)."""
    from orchestrator.tracking.runs import end_run

    for run_id in open_segments(uri, job_run_id):
        end_run(uri, run_id, status, reason=reason)  # type: ignore[arg-type]


# -- driver side: resume / rollback ----------------------------------------------------------
def _mark_stale(uri: str, run_id: str) -> bool:
    """End a RUNNING run whose driver is gone (resume implies it is): KILLED, with its segments."""
    from orchestrator.audit.fetch import RunView
    from orchestrator.audit.reconcile import end_stale, judge

    view = RunView.of(_client(uri).get_run(run_id))
    if view.status != "RUNNING":
        return False
    verdict = judge(view, stale_after_s=0.0)  # the rule of `regimen audit --reconcile`
    if verdict.alive_here:
        raise UsageError(
            f"run {run_id} is still running ({verdict.reason}): stop it first (Ctrl-C, or kill "
            "that process), then resume"
        )
    end_stale(uri, view, verdict.reason if verdict.stale else "assumed by resume", "regimen resume")
    return True


def _abandon_after(run_dir: Path, step: int, label: str) -> list[str]:
    """Move checkpoints after ``step`` to ``run_dir/abandoned/<label>/`` (kept, never loaded)."""
    from orchestrator.engine.checkpoint import CheckpointStore

    rd = RunDir(run_dir)
    store = CheckpointStore(rd.checkpoints, keep=0)
    moved = []
    for info in store.list():
        if info.step > step:
            dest = rd.abandoned_for(label) / info.path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(info.path, dest)
            moved.append(str(dest))
    return moved


def continue_run(
    run_id: str,
    *,
    tracking_uri: str,
    to_step: int | None = None,
    skip_batches: int = 0,
    lr_scale: float | None = None,
    address: str | None = None,
) -> Any:
    """Resume (``to_step`` None) or roll back ``run_id`` in a new MLflow run; the JobResult."""
    from orchestrator.cluster.launch import ensure_ray
    from orchestrator.control.controller import run_job
    from orchestrator.engine.checkpoint import CheckpointStore
    from orchestrator.engine.remote import CheckpointMirror
    from orchestrator.recipe.expand import Variant
    from orchestrator.recipe.loader import load_recipe_text
    from orchestrator.tracking.runs import read_recipe_yaml

    client = _client(tracking_uri)
    try:
        old = client.get_run(run_id)
    except Exception as exc:
        raise UsageError(
            f"no MLflow run {run_id!r} at {tracking_uri}: check the id and --tracking-uri"
        ) from exc
    run_dir_tag = old.data.tags.get("regimen.run_dir")
    storage_uri = old.data.tags.get("regimen.storage_uri")
    recipe = load_recipe_text(read_recipe_yaml(tracking_uri, run_id), name=f"{run_id}/recipe.yaml")
    if run_dir_tag and Path(run_dir_tag).is_dir():
        run_dir = Path(run_dir_tag)
    elif storage_uri:  # another machine, or the cluster is gone: a fresh local working copy
        name = Path(run_dir_tag or run_id).name
        run_dir = RunDir.under(recipe.checkpoint.local_root, name).create().root
    else:
        raise UsageError(
            f"run {run_id} has no reachable storage (tag regimen.run_dir={run_dir_tag!r}): "
            "mount the same storage path on this machine"
        )
    local_key = "local_dir" if storage_uri else "storage"
    recipe = recipe.model_copy(
        update={
            "tracking": recipe.tracking.model_copy(update={"uri": tracking_uri}),
            "checkpoint": recipe.checkpoint.model_copy(update={local_key: str(run_dir.parent)}),
        }
    )
    rd = RunDir(run_dir)
    store = CheckpointStore(rd.checkpoints, keep=0)
    mirror = CheckpointMirror(storage_uri) if storage_uri else None
    if mirror is not None:  # the storage may hold newer checkpoints than this machine
        local = store.latest(to_step)
        mirror.pull_latest(store.root, local.step if local else None, to_step)
    target = store.latest(to_step)
    if target is None:
        where = f"at or before step {to_step}" if to_step is not None else "at all"
        raise UsageError(f"run {run_id} has no committed checkpoint {where} in {store.root}")
    stale = _mark_stale(tracking_uri, run_id)
    rd.clear_stopped()  # a person decided to go on
    kind = "resume" if to_step is None else "rollback"
    root = old.data.tags.get("regimen.root_run_id", run_id)
    segment = int(old.data.tags.get("regimen.segment", "0")) + 1
    tags = {
        "regimen.parent_run_id": run_id,
        "regimen.root_run_id": root,
        "regimen.segment": str(segment),
        "regimen.restored_step": str(target.step),
        "regimen.reason": kind,
        "regimen.parent_was_stale": str(stale).lower(),
    }
    if kind == "rollback":
        moved = _abandon_after(run_dir, target.step, f"{kind}-{segment}")
        if mirror is not None:
            mirror.abandon_after(target.step, f"{kind}-{segment}")
        cursor = int(target.manifest.get("meta", {}).get("cursor", 0))
        skip = [[cursor, cursor + skip_batches * recipe.global_batch_size]] if skip_batches else []
        rd.write_segment(Segment(segment, target.step, [(a, b) for a, b in skip], lr_scale))
        tags |= {
            "regimen.skipped_ranges": _tag(skip),
            "regimen.lr_scale": str(lr_scale if lr_scale is not None else 1.0),
            "regimen.abandoned_checkpoints": _tag(moved),
        }
    counter = "regimen.resumes" if kind == "resume" else "regimen.manual_rollbacks"
    _count(client, root, counter, step=target.step)
    ensure_ray(address)
    variant = Variant(
        name=old.data.tags.get("regimen.variant", recipe.name), assignments={}, recipe=recipe
    )
    return run_job(variant, parent_run_id=run_id, run_id=run_dir.name, extra_tags=tags)
