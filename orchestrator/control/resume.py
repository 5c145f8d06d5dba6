"""Resume and manual rollback of a job from MLflow.

* ``regimen resume RUN_ID``: a new job run (child of RUN_ID) continues the same run directory
  from its last committed checkpoint;
* ``regimen rollback RUN_ID --to-step N``: the same from the checkpoint at or before N, with
  optional skipped batches and LR scale. Checkpoints after it are moved to
  ``<run_dir>/abandoned/`` (never deleted) so that nothing resumes into the old timeline.

The lineage this writes (tags of the new run, counters of the root run) is defined in
:mod:`orchestrator.tracking.segments`, which also opens the in-place rollback segments of
the workers. A stale RUNNING run (its driver was killed) is ended KILLED when resume touches
it, with its open segment runs (the rule of :mod:`orchestrator.audit.reconcile`).

The recipe to run again is the stored ``recipe.yaml`` (:func:`recipe_to_continue`): its
``${env:NAME}`` secrets are resolved again from this environment, and a masked value
(``***``, what redaction stored for a secret written in the clear) is refused, never used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UsageError
from orchestrator.rundir import RunDir, Segment
from orchestrator.tracking import segments
from orchestrator.tracking.client import mlflow_client

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe


def _mark_stale(uri: str, run_id: str) -> bool:
    """End a RUNNING run whose driver is gone (resume implies it is): KILLED, with its segments."""
    from orchestrator.audit.fetch import RunView
    from orchestrator.audit.reconcile import end_stale, judge

    view = RunView.of(mlflow_client(uri).get_run(run_id))
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


def recipe_to_continue(text: str, run_id: str) -> Recipe:
    """The recipe to resume ``run_id`` with, from its stored ``recipe.yaml`` ``text``.

    ``${env:NAME}`` references are resolved from this process's environment (an unset
    variable is a RecipeError naming key and variable). A key whose stored value holds the
    redaction mask (the run wrote that secret in the clear, before references) stops resume
    with a UsageError naming the key: the masked value is never used.
    """
    import yaml

    from orchestrator.envrefs import keys_holding
    from orchestrator.recipe.loader import MAX_FILE_BYTES, load_recipe_text
    from orchestrator.tracking.redact import MASK

    name = f"{run_id}/recipe.yaml"
    data: Any = None
    if len(text.encode("utf-8", "replace")) <= MAX_FILE_BYTES:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None  # load_recipe_text reports it, located
    masked = keys_holding(data, MASK)
    if masked:
        key = masked[0]
        leaf = key.rpartition(".")[2]
        more = f" (and {', '.join(masked[1:])})" if len(masked) > 1 else ""
        raise UsageError(
            f"{name}: {key}{more}: the stored recipe holds the masked value {MASK!r} where a "
            f"secret was written in the clear; resume never uses a masked value. Write it as a "
            f"reference in the recipe (`{leaf}: ${{env:NAME}}`), export NAME=<the secret>, and "
            "start the run again with `regimen run RECIPE`"
        )
    return load_recipe_text(text, name=name)


@dataclass(frozen=True)
class LocatedRun:
    """A run found from its MLflow record: the run, its stored recipe, its run directory on
    this machine, and the storage URI its checkpoints are mirrored to (or None)."""

    run: Any
    recipe: Recipe
    run_dir: Path
    storage_uri: str | None

    def checkpoint(self, at_or_before: int | None = None, exact: bool = False) -> Any:
        """The newest committed checkpoint (with ``step <= at_or_before``; ``exact``: that
        step only), pulled from the storage first when the storage holds a newer one; None
        when there is none."""
        from orchestrator.engine.checkpoint import CheckpointStore
        from orchestrator.engine.remote import CheckpointMirror

        store = CheckpointStore(RunDir(self.run_dir).checkpoints, keep=0)
        if self.storage_uri:  # the storage may hold newer checkpoints than this machine
            local = store.latest(at_or_before)
            newer_than = local.step if local else None
            if exact and at_or_before is not None and newer_than != at_or_before:
                newer_than = at_or_before - 1  # pulls that very step when the storage has it
            CheckpointMirror(self.storage_uri).pull_latest(store.root, newer_than, at_or_before)
        info = store.latest(at_or_before)
        if exact and info is not None and info.step != at_or_before:
            return None
        return info


def locate_run(run_id: str, tracking_uri: str) -> LocatedRun:
    """Find ``run_id``'s recipe and storage from MLflow (tags ``regimen.run_dir`` and
    ``regimen.storage_uri``, artifact ``recipe.yaml``); UsageError when it cannot be found."""
    from orchestrator.tracking.runs import read_recipe_yaml

    try:
        old = mlflow_client(tracking_uri).get_run(run_id)
    except Exception as exc:
        raise UsageError(
            f"no MLflow run {run_id!r} at {tracking_uri}: check the id and --tracking-uri"
        ) from exc
    run_dir_tag = old.data.tags.get("regimen.run_dir")
    storage_uri = old.data.tags.get("regimen.storage_uri")
    recipe = recipe_to_continue(read_recipe_yaml(tracking_uri, run_id), run_id)
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
    return LocatedRun(old, recipe, run_dir, storage_uri)


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
    from orchestrator.recipe.jobspec import JobSpec

    found = locate_run(run_id, tracking_uri)
    old, recipe, run_dir, storage_uri = found.run, found.recipe, found.run_dir, found.storage_uri
    rd = RunDir(run_dir)
    target = found.checkpoint(to_step)
    if target is None:
        where = f"at or before step {to_step}" if to_step is not None else "at all"
        raise UsageError(f"run {run_id} has no committed checkpoint {where} in {rd.checkpoints}")
    stale = _mark_stale(tracking_uri, run_id)
    rd.clear_stopped()  # a person decided to go on
    kind: segments.ContinuationKind = "resume" if to_step is None else "rollback"
    segment = segments.next_segment(old.data.tags)
    rollback: dict[str, Any] = {}
    if kind == "rollback":
        moved = _abandon_after(run_dir, target.step, f"{kind}-{segment}")
        if storage_uri:
            from orchestrator.engine.remote import CheckpointMirror

            CheckpointMirror(storage_uri).abandon_after(target.step, f"{kind}-{segment}")
        cursor = int(target.manifest.get("meta", {}).get("cursor", 0))
        skip = [[cursor, cursor + skip_batches * recipe.global_batch_size]] if skip_batches else []
        rd.write_segment(Segment(segment, target.step, [(a, b) for a, b in skip], lr_scale))
        rollback = {"skipped_ranges": skip, "lr_scale": lr_scale, "abandoned": moved}
    tags = segments.continuation_tags(
        run_id,
        old.data.tags,
        kind=kind,
        restored_step=target.step,
        parent_was_stale=stale,
        **rollback,
    )
    segments.count_continuation(tracking_uri, tags[segments.ROOT_RUN_ID], kind, target.step)
    spec = JobSpec.continuing(
        old.data.tags.get("regimen.variant", recipe.name),
        recipe,
        kind=kind,
        tracking_uri=tracking_uri,
        run_dir=run_dir,
        remote_storage=bool(storage_uri),
        parent_run_id=run_id,
        tags=tags,
    )
    ensure_ray(address)
    return run_job(spec)
