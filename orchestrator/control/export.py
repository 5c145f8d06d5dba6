"""``regimen export RUN_ID [--step N] OUT_DIR``: any committed checkpoint of any run as a
Hugging Face directory.

The run is found as ``regimen resume`` finds it (:func:`~orchestrator.control.resume.locate_run`:
its MLflow tags and stored recipe); the checkpoint (step N, or the newest) comes from the run
directory, pulled from ``checkpoint.storage`` first when only the storage holds it. It is
verified in full before anything is read (every file against its SHA-256 manifest, every
DeepSpeed pickle scanned; a partial or tampered checkpoint is refused), then its weights are
read weights-only into the model the recipe builds and written with ``save_pretrained``
(:func:`orchestrator.engine.export.export_checkpoint`, atomic: temp dir and rename).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError


def export_run(
    run_id: str,
    out_dir: str | Path,
    *,
    tracking_uri: str,
    step: int | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export run ``run_id``'s checkpoint at ``step`` (default: its newest) to ``out_dir``;
    ``{"run_id", "step", "checkpoint", "path", "run_dir"}``. UsageError (exit 2) for an
    unknown run, a model that is not a Hugging Face one, no committed checkpoint at
    ``step``, or an ``out_dir`` that exists and is not an empty directory."""
    from orchestrator.control.resume import locate_run
    from orchestrator.engine.checkpoint import CheckpointStore
    from orchestrator.engine.export import HF_KINDS, export_checkpoint, exportable
    from orchestrator.rundir import RunDir

    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory: give a new OUT_DIR")
    say = on_progress or (lambda _: None)
    found = locate_run(run_id, tracking_uri)
    if not exportable(found.recipe.model):
        raise UsageError(
            f"run {run_id} trains a model.kind {found.recipe.model.kind!r} model; export writes "
            f"Hugging Face directories, for model.kind {' or '.join(HF_KINDS)}"
        )
    say(f"locating the checkpoint of run {run_id} in {found.run_dir}")
    info = found.checkpoint(step, exact=step is not None)
    store = CheckpointStore(RunDir(found.run_dir).checkpoints, keep=0)
    if info is None:
        steps = [i.step for i in store.list()]
        where = f"at step {step}" if step is not None else "at all"
        raise UsageError(
            f"run {run_id} has no committed checkpoint {where} in {store.root} "
            f"(committed steps: {', '.join(map(str, steps)) or 'none'})"
        )
    say(f"verifying checkpoint step {info.step} ({len(info.manifest['files'])} files)")
    store.verify(info)
    store.scan_pickles(info)
    path = export_checkpoint(found.recipe, info, out, on_progress=say, record={"run_id": run_id})
    return {
        "run_id": run_id,
        "step": info.step,
        "checkpoint": str(info.path),
        "path": str(path),
        "run_dir": str(found.run_dir),
    }
