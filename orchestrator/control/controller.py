"""The driver-side controller: one MLflow run per job, its launch, a true final status.

States of a job: PENDING -> RUNNING -> FINISHED | FAILED | KILLED. Whatever
happens on the driver (success, a training error, Ctrl-C, SIGTERM), the MLflow
run is ended with one of the three final statuses before control returns.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import RegimenError
from orchestrator.recipe.expand import Variant
from orchestrator.recipe.jobspec import JobSpec, absolute_tracking_uri
from orchestrator.recipe.storage import is_remote
from orchestrator.rundir import METRICS_SPOOL_SUFFIX, RunDir
from orchestrator.timeline import PROCESS, Timeline, phase_seconds

if TYPE_CHECKING:
    from orchestrator.cluster.workers import WorkerGroup, WorkerJob, WorkerPool

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
    parent_run_id: str | None = None
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


def open_job_run(spec: JobSpec) -> tuple[str, Path]:
    """Open the job's MLflow run and create its run directory: (run id, run directory).

    MLflow receives the recipe with its ``${env:NAME}`` references (artifact, params and
    tags), never their values.
    """
    from orchestrator.tracking.record import driver_tags
    from orchestrator.tracking.runs import open_run, set_tags

    recipe, tracking = spec.recipe, spec.recipe.tracking
    stored = spec.recipe_data
    tags = {**stored["tracking"]["tags"], "regimen.variant": spec.name, **spec.tags}
    tags.update(driver_tags())
    run_id = open_run(
        tracking.uri,
        tracking.experiment,
        tracking.run_name or spec.name,
        recipe=stored,
        recipe_yaml=spec.recipe_yaml,
        tags=tags,
        parent_run_id=spec.parent_run_id,
    )
    run_dir = RunDir(spec.run_dir(run_id)).create().root
    storage_tags = {"regimen.run_dir": str(run_dir)}
    if is_remote(recipe.checkpoint.storage):  # where `regimen resume` finds it from anywhere
        from orchestrator.engine.remote import run_storage_uri  # (imports torch)

        storage_tags["regimen.storage_uri"] = run_storage_uri(
            recipe.checkpoint.storage, run_dir.name
        )
    set_tags(tracking.uri, run_id, storage_tags)
    return run_id, run_dir


def run_job(
    spec: JobSpec,
    *,
    on_progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    pool: WorkerPool | None = None,
) -> JobResult:
    """Train one job on the connected Ray cluster and end its MLflow run truthfully.

    A spec that continues a run (``spec.run_key``) trains in that run's directory under a
    new MLflow run that points back to it. Setting ``cancel`` (from another thread) ends
    the run KILLED and returns a KILLED result. On the worker-group launcher (the
    default), the job's group comes from ``pool`` (a warm one when it holds one) and goes
    back to it if the job finished cleanly; without a pool the group is shut down after.
    """
    from orchestrator.cluster.launch import ProgressBoard, make_trainer
    from orchestrator.cluster.workers import WorkerGroup, WorkerJob
    from orchestrator.tracking.record import DriverHeartbeat, log_checkpoints
    from orchestrator.tracking.runs import end_run, log_summary

    recipe, tracking = spec.recipe, spec.recipe.tracking
    timeline = Timeline(PROCESS.marks)  # this job's marks (driver and rank 0), from the start
    timeline.mark("run.begin")
    resources = recipe.resources
    job: WorkerJob | None = None
    if resources.launcher == "workers":
        # the actors start (and import the engine) while the driver opens the MLflow run
        timeline.mark("workers.begin")
        group = pool.acquire(resources) if pool is not None else WorkerGroup(resources)
        job = WorkerJob(resources, group, new_group=_group_maker(resources, pool))
    try:
        new_run_id, run_dir = open_job_run(spec)
    except BaseException:
        if job is not None:
            job.stop()
        raise
    timeline.mark("run.ready")
    result = JobResult(
        variant=spec.name, run_id=new_run_id, status="RUNNING", run_dir=str(run_dir),
        parent_run_id=spec.parent_run_id,
    )  # fmt: skip
    result.extra["startup"] = timeline.marks
    board = ProgressBoard.remote()  # type: ignore[attr-defined]
    config = spec.worker_config(run_dir, new_run_id)
    outcome: dict[str, BaseException | None] = {"error": None}
    if job is not None:
        on_restart = _restart_recorder(tracking.uri, new_run_id, pool)
        start: Callable[[], Any] = lambda: job.run({**config, "progress": board}, on_restart)  # noqa: E731
    else:
        start = make_trainer(recipe, config, progress=board).fit

    def fit() -> None:
        try:
            start()
        except BaseException as exc:
            outcome["error"] = exc

    def stop_workers() -> None:
        if job is not None:
            job.stop()

    worker = threading.Thread(target=fit, name=f"fit-{spec.name}", daemon=True)
    heartbeat = DriverHeartbeat(tracking.uri, [new_run_id]).__enter__()
    try:
        if job is None:  # Ray Train's workers start with the fit
            timeline.mark("workers.begin")
        worker.start()
        while worker.is_alive():
            worker.join(timeout=0.5)
            if on_progress is not None:
                on_progress(spec.name, _poll(board))
            if cancel is not None and cancel.is_set():
                stop_workers()
                end_run(tracking.uri, new_run_id, "KILLED", reason="sweep interrupted")
                _fill_from_summary(result, _job_summary(board, run_dir))
                result.status, result.error = "KILLED", "interrupted"
                return result
        if outcome["error"] is not None:
            raise outcome["error"]
    except KeyboardInterrupt:
        stop_workers()
        end_run(tracking.uri, new_run_id, "KILLED", reason="interrupted (Ctrl-C or SIGTERM)")
        raise
    except Exception as exc:
        stop_workers()
        result.status, result.error = "FAILED", _root_cause(exc)
        _note_restarts(result, job)
        replay_leftover_metrics(tracking.uri, run_dir)
        log_checkpoints(tracking.uri, new_run_id, run_dir)
        end_run(tracking.uri, new_run_id, "FAILED", reason=result.error)
        _fill_from_summary(result, _job_summary(board, run_dir))
        return result
    finally:
        heartbeat.__exit__()
    timeline.mark("fit.done")
    if job is not None:
        if pool is not None:
            pool.release(job.group)  # warm for the next variant
        else:
            job.group.shutdown()
    _note_restarts(result, job)
    replay_leftover_metrics(tracking.uri, run_dir)
    _fill_from_summary(result, _job_summary(board, run_dir))
    log_checkpoints(tracking.uri, new_run_id, run_dir)
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
    metrics.update({f"startup/{k}_s": v for k, v in phase_seconds(timeline.marks).items()})
    exported = result.extra.get("export") or {}
    tags = {"regimen.checkpoint": result.checkpoint or ""}
    if exported.get("path"):
        tags["regimen.export"] = exported.get("uri") or exported["path"]
    log_summary(tracking.uri, new_run_id, metrics, tags=tags, model_id=exported.get("model_id"))
    end_run(tracking.uri, new_run_id, "FINISHED")
    timeline.mark("run.ended")
    result.extra["startup"] = timeline.to_dict()
    return result


def _group_maker(
    resources: Any, pool: WorkerPool | None
) -> Callable[[frozenset[str]], WorkerGroup]:
    """How a job's restart makes its fresh group: off the nodes the job excluded and, in a
    sweep, off those any variant found bad by then (the pool's, read at each restart)."""
    from orchestrator.cluster.workers import WorkerGroup

    def make(excluded: frozenset[str]) -> WorkerGroup:
        shared = pool.excluded if pool is not None else frozenset()
        return WorkerGroup(resources, excluded | shared)

    return make


def _note_restarts(result: JobResult, job: WorkerJob | None) -> None:
    """The job's restarts, and the nodes it was moved off, in its result (``--json``)."""
    if job is not None and job.restarts:
        result.extra["restarts"] = job.restarts
    if job is not None and job.excluded:
        result.extra["excluded_nodes"] = sorted(job.excluded)


def _restart_recorder(
    tracking_uri: str, run_id: str, pool: WorkerPool | None = None
) -> Callable[[dict[str, Any]], None]:
    """What the driver does when the job restarts without a bad worker's node: a
    ``restart_without_node`` event and the ``regimen.excluded_nodes`` tag (a warning, not a
    failure, while MLflow is unreachable), and the node kept out of ``pool``'s later groups
    (a sweep's other variants)."""
    import logging

    from orchestrator.errors import TrackingError
    from orchestrator.tracking.runs import log_event, set_tags

    def record(facts: dict[str, Any]) -> None:
        if pool is not None and facts.get("node_id"):
            pool.exclude(str(facts["node_id"]))
        logging.getLogger(__name__).warning(
            "run %s: restarting without node %s (host %s): rank %s looked faulty",
            run_id, facts["node_id"], facts["host"], facts["rank"],
        )  # fmt: skip
        try:
            log_event(tracking_uri, run_id, "restart_without_node", int(facts["step"]), facts)
            set_tags(
                tracking_uri, run_id, {"regimen.excluded_nodes": ",".join(facts["excluded_nodes"])}
            )
        except TrackingError as exc:
            logging.getLogger(__name__).warning("%s", exc)

    return record


def replay_leftover_metrics(tracking_uri: str, run_dir: Path) -> int:
    """Send the points the workers' metric sinks left in ``run_dir/spool`` (MLflow was down
    when they closed); return how many. Points stay on disk if MLflow is still unreachable."""
    import logging

    from orchestrator.errors import TrackingError
    from orchestrator.tracking.sink import replay_spool

    sent = 0
    for path in RunDir(run_dir).metric_spools():
        if not path.stat().st_size:
            continue
        try:
            sent += replay_spool(tracking_uri, path.name.removesuffix(METRICS_SPOOL_SUFFIX), path)
        except TrackingError as exc:
            logging.getLogger(__name__).warning("%s", exc)
    return sent


def _poll(board: Any) -> dict[str, Any]:
    import ray

    try:
        return dict(ray.get(board.get.remote(), timeout=2.0))
    except Exception:
        return {}


def _job_summary(board: Any, run_dir: Path) -> dict[str, Any] | None:
    """What rank 0 returned (sent through the job's board), else its crash-safe record on
    disk (a job that failed or was cut short returned nothing)."""
    import ray

    try:
        returned = ray.get(board.result.remote(), timeout=5.0)
    except Exception:
        returned = None
    return returned if returned is not None else RunDir(run_dir).read_summary()


def _fill_from_summary(result: JobResult, summary: dict[str, Any] | None) -> None:
    if not summary:
        return
    result.steps = int(summary.get("steps") or 0)
    result.final_loss = summary.get("final_loss")
    result.eval_loss = summary.get("eval_loss")
    result.rollbacks = int(summary.get("rollbacks") or 0)
    result.checkpoint = summary.get("checkpoint")
    result.extra["skipped_steps"] = summary.get("skipped_steps", 0)
    if isinstance(result.extra.get("startup"), dict):  # rank 0's marks join the driver's
        result.extra["startup"].update(summary.get("startup") or {})
    if summary.get("export"):  # the final model: path, uri (mirrored), model_id (MLflow)
        result.extra["export"] = summary["export"]
    if summary.get("eval_accuracy") is not None:
        result.extra["eval_accuracy"] = summary["eval_accuracy"]
    if "continual" in summary:  # the final continual metrics (cl/final/* in MLflow)
        result.extra["continual"] = summary["continual"]["metrics"]


def run_variants(
    variants: list[Variant],
    *,
    recipe_name: str,
    address: str | None = None,
    on_progress: ProgressFn | None = None,
    max_concurrent: int | None = None,
    pool: WorkerPool | None = None,
) -> list[JobResult]:
    """Run every variant under a parent MLflow run when there are several.

    Variants run concurrently, up to ``max_concurrent`` (the recipe's
    ``sweep.max_concurrent``; default that field's default) at once, each in its own
    driver thread on a warm worker group from one :class:`WorkerPool` (a variant that
    follows another of the same resources reuses its processes; ``launcher: ray_train``:
    its own TorchTrainer); Ray queues those that do not fit yet. One variant failing does
    not stop the others; the parent run ends FINISHED only if every variant did. Before
    anything starts, tokenizer and data problems (orchestrator.data.preflight) and
    resources that can never fit the connected cluster are refused (``UsageError``,
    ``ResourceFitError``: exit 2). ``pool``: the caller's warm groups (left open); by
    default a pool of this call's own, shut down at its end.
    """
    from orchestrator.cluster.fit import check_variants, cluster_nodes, jobs_at_once
    from orchestrator.cluster.launch import ensure_ray
    from orchestrator.cluster.workers import WorkerPool
    from orchestrator.tracking.record import DriverHeartbeat, driver_tags
    from orchestrator.tracking.runs import StoreOpening, end_run, open_run

    if any(v.recipe.uses_tokenizer for v in variants):
        from orchestrator.data.preflight import check_recipes

        check_recipes(v.recipe for v in variants)  # before Ray starts: a bad tokenizer fails fast
    tracking = variants[0].recipe.tracking
    tracking = tracking.model_copy(update={"uri": absolute_tracking_uri(tracking.uri)})
    store = StoreOpening(tracking.uri)  # MLflow's store opens while Ray starts
    PROCESS.mark("ray.begin")
    try:
        ensure_ray(address)
        PROCESS.mark("ray.ready")
    finally:
        store.wait()
    PROCESS.mark("store.begin", at=store.began_at)
    PROCESS.mark("store.ready", at=store.ready_at)
    nodes = cluster_nodes()
    check_variants(variants, nodes)
    job_tags = (
        {"regimen.job_id": os.environ["REGIMEN_JOB_ID"]} if "REGIMEN_JOB_ID" in os.environ else {}
    )

    def spec_of(variant: Variant, parent_run_id: str | None = None) -> JobSpec:
        return JobSpec.of(variant.name, variant.recipe, parent_run_id=parent_run_id, tags=job_tags)

    if len(variants) == 1:
        return [run_job(spec_of(variants[0]), on_progress=on_progress, pool=pool)]
    if max_concurrent is None:  # expanded variants carry no sweep section
        from orchestrator.recipe.schema import SweepConfig

        sweep = variants[0].recipe.sweep
        max_concurrent = (sweep or SweepConfig()).max_concurrent
    limit = max(1, min(len(variants), max_concurrent))
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # Regimen's own local Ray has fixed resources: variants beyond what it holds at once
        # wait here rather than in Ray, where each would already cost a Ray Train controller
        # process (~400 MB; 50 waiting ones filled 24 GB). A cluster may autoscale on queued
        # demand, so there Ray queues them.
        limit = min(limit, *(jobs_at_once(v.recipe.resources, nodes) for v in variants))
    parent = open_run(
        tracking.uri,
        tracking.experiment,
        recipe_name,
        tags={"regimen.role": "sweep", "regimen.variants": str(len(variants)), **job_tags}
        | {"regimen.concurrency": str(limit)}
        | driver_tags(),
    )
    cancel = threading.Event()
    warm = pool if pool is not None else WorkerPool()  # a group per slot and resource shape

    def one(variant: Variant) -> JobResult:
        if cancel.is_set():
            return JobResult(variant=variant.name, run_id="", status="KILLED", error="not started")
        try:
            return run_job(
                spec_of(variant, parent), on_progress=on_progress, cancel=cancel, pool=warm
            )
        except Exception as exc:  # e.g. MLflow refused to open the run: this variant only
            return JobResult(
                variant=variant.name, run_id="", status="FAILED", error=_root_cause(exc)
            )

    threads = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="variant")
    futures = [threads.submit(one, v) for v in variants]
    heartbeat = DriverHeartbeat(tracking.uri, [parent]).__enter__()
    try:
        while not all(f.done() for f in futures):
            wait_quietly(0.2)
    except KeyboardInterrupt:
        cancel.set()
        for f in futures:
            f.cancel()
        futures_wait(futures, timeout=15)
        threads.shutdown(wait=False, cancel_futures=True)
        end_run(tracking.uri, parent, "KILLED", reason="interrupted")
        raise
    finally:
        heartbeat.__exit__()
        if pool is None:
            warm.shutdown()
    threads.shutdown(wait=True)
    results = [f.result() for f in futures]
    failed = [r for r in results if r.status != "FINISHED"]
    end_run(
        tracking.uri,
        parent,
        "FAILED" if failed else "FINISHED",
        reason=("; ".join(f"{r.variant}: {r.status}" for r in failed) or None) if failed else None,
    )
    return results


def wait_quietly(seconds: float) -> None:
    """Sleep in small slices so Ctrl-C is handled promptly."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(0.2, end - time.monotonic()))


__all__ = ["JobResult", "RegimenError", "run_job", "run_variants"]
