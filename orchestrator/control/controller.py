"""The driver-side controller: one MLflow run per job, a Ray Train fit, a true final status.

States of a job: PENDING -> RUNNING -> FINISHED | FAILED | KILLED. Whatever
happens on the driver (success, a training error, Ctrl-C, SIGTERM), the MLflow
run is ended with one of the three final statuses before control returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.engine.loop import read_summary
from orchestrator.errors import RegimenError
from orchestrator.recipe.expand import Variant
from orchestrator.recipe.loader import dump_recipe

ProgressFn = Callable[[str, dict[str, Any]], None]


@dataclass
class JobResult:
    """What a job ended as; ``--json`` prints this."""

    variant: str
    run_id: str
    status: str
    steps: int = 0
    final_loss: float | None = None
    eval_loss: float | None = None
    rollbacks: int = 0
    checkpoint: str | None = None
    run_dir: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain dict for the CLI's JSON line."""
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


def _root_cause(exc: BaseException) -> str:
    """The first worker error of a Ray Train failure, as one readable line."""
    failures = getattr(exc, "worker_failures", None) or {}
    for error in failures.values():
        return f"{type(error).__name__}: {error}".strip().splitlines()[-1][:2000]
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:2000]


def run_job(
    variant: Variant,
    *,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    resume_step: int | None = None,
    on_progress: ProgressFn | None = None,
    extra_tags: dict[str, str] | None = None,
) -> JobResult:
    """Train one variant on the connected Ray cluster and end its MLflow run truthfully.

    With ``run_id`` given, the job continues that run's storage (resume) under
    a new MLflow run that points back to it.
    """
    from orchestrator.cluster.launch import ProgressBoard, make_trainer
    from orchestrator.tracking.runs import end_run, log_summary, open_run, set_tags

    recipe = variant.recipe
    tracking = recipe.tracking.model_copy(update={"uri": absolute_tracking_uri(recipe.tracking.uri)})
    recipe_yaml = dump_recipe(recipe)
    tags = {**tracking.tags, "regimen.variant": variant.name, **(extra_tags or {})}
    new_run_id = open_run(
        tracking.uri,
        tracking.experiment,
        tracking.run_name or variant.name,
        recipe=recipe.model_dump(mode="json"),
        recipe_yaml=recipe_yaml,
        tags=tags,
        parent_run_id=parent_run_id,
    )
    run_dir = Path(recipe.checkpoint.storage).resolve() / (run_id or new_run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_tags(tracking.uri, new_run_id, {"regimen.run_dir": str(run_dir)})
    result = JobResult(variant=variant.name, run_id=new_run_id, status="RUNNING", run_dir=str(run_dir))
    board = ProgressBoard.remote()  # type: ignore[attr-defined]
    trainer = make_trainer(
        recipe,
        recipe_yaml,
        run_dir,
        tracking_uri=tracking.uri,
        run_id=new_run_id,
        resume_step=resume_step,
        progress=board,
    )
    outcome: dict[str, BaseException | None] = {"error": None}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001  (reported to the driver thread)
            outcome["error"] = exc

    worker = threading.Thread(target=fit, name=f"fit-{variant.name}", daemon=True)
    try:
        worker.start()
        while worker.is_alive():
            worker.join(timeout=0.5)
            if on_progress is not None:
                on_progress(variant.name, _poll(board))
        if outcome["error"] is not None:
            raise outcome["error"]
    except KeyboardInterrupt:
        end_run(tracking.uri, new_run_id, "KILLED", reason="interrupted (Ctrl-C or SIGTERM)")
        raise
    except Exception as exc:  # noqa: BLE001
        result.status, result.error = "FAILED", _root_cause(exc)
        end_run(tracking.uri, new_run_id, "FAILED", reason=result.error)
        _fill_from_summary(result, run_dir)
        return result
    _fill_from_summary(result, run_dir)
    result.status = "FINISHED"
    metrics = {
        k: float(v)
        for k, v in {
            "final_loss": result.final_loss,
            "final_eval_loss": result.eval_loss,
            "rollbacks": result.rollbacks,
            "steps": result.steps,
        }.items()
        if v is not None
    }
    log_summary(tracking.uri, new_run_id, metrics, tags={"regimen.checkpoint": result.checkpoint or ""})
    end_run(tracking.uri, new_run_id, "FINISHED")
    return result


def absolute_tracking_uri(uri: str) -> str:
    """Pin a relative sqlite/file URI to the driver's working directory.

    Ray workers run in their own working directory: a relative ``sqlite:///mlflow.db``
    there would be a different database.
    """
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            path = uri[len(scheme) :]
            if path and not path.startswith("/") and path != ":memory:":
                return scheme + str(Path(path).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def _poll(board: Any) -> dict[str, Any]:
    import ray

    try:
        return dict(ray.get(board.get.remote(), timeout=2.0))
    except Exception:  # noqa: BLE001  (progress is best effort)
        return {}


def _fill_from_summary(result: JobResult, run_dir: Path) -> None:
    summary = read_summary(run_dir)
    if not summary:
        return
    result.steps = int(summary.get("steps") or 0)
    result.final_loss = summary.get("final_loss")
    result.eval_loss = summary.get("eval_loss")
    result.rollbacks = int(summary.get("rollbacks") or 0)
    result.checkpoint = summary.get("checkpoint")
    result.extra["skipped_steps"] = summary.get("skipped_steps", 0)


def run_variants(
    variants: list[Variant],
    *,
    recipe_name: str,
    address: str | None = None,
    on_progress: ProgressFn | None = None,
) -> list[JobResult]:
    """Run every variant (sequentially) under a parent MLflow run when there are several."""
    from orchestrator.cluster.launch import ensure_ray
    from orchestrator.tracking.runs import end_run, open_run

    ensure_ray(address)
    parent = None
    tracking = variants[0].recipe.tracking
    tracking = tracking.model_copy(update={"uri": absolute_tracking_uri(tracking.uri)})
    if len(variants) > 1:
        parent = open_run(
            tracking.uri,
            tracking.experiment,
            recipe_name,
            tags={"regimen.role": "sweep", "regimen.variants": str(len(variants))},
        )
    results: list[JobResult] = []
    try:
        for variant in variants:
            results.append(run_job(variant, parent_run_id=parent, on_progress=on_progress))
    except KeyboardInterrupt:
        if parent:
            end_run(tracking.uri, parent, "KILLED", reason="interrupted")
        raise
    if parent:
        failed = [r for r in results if r.status != "FINISHED"]
        end_run(tracking.uri, parent, "FAILED" if failed else "FINISHED")
    return results


def wait_quietly(seconds: float) -> None:
    """Sleep in small slices so Ctrl-C is handled promptly."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(0.2, end - time.monotonic()))


__all__ = ["JobResult", "RegimenError", "run_job", "run_variants"]
