"""Ray for one job: the embedded or connected Ray, the per-rank entry, the Ray Train launcher.

A job runs on Regimen's own warm worker group (:mod:`orchestrator.cluster.workers`, the
default) or as a Ray Train ``TorchTrainer`` (``resources.launcher: ray_train``); both call
:func:`run_rank` on every rank. The driver passes the resolved recipe as YAML text (not
a pickle), the run directory and the MLflow run; each worker rebuilds the recipe and
trains. A small ``ProgressBoard`` actor carries rank 0's progress back for the terminal.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ray

from orchestrator.errors import UsageError
from orchestrator.recipe.schema import Recipe
from orchestrator.recipe.sections import ResourcesConfig
from orchestrator.rundir import RunDir

_QUIET_ENV = {
    "RAY_TRAIN_V2_ENABLED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
    # No DS_ACCELERATOR here: the driver (a KubeRay head, a laptop) may have no GPU while
    # its workers do. Each worker picks its own (worker_accelerator, in run_rank).
    # A dead tracking server must not stall the sink for minutes (MLflow's default:
    # 7 retries x 120 s); the sink spools to disk and replays instead.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` or start an embedded local Ray (idempotent)."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "log_to_driver": os.environ.get("REGIMEN_WORKER_LOGS", "0") == "1",
        "include_dashboard": False,
    }
    # ray.init installs a SIGTERM handler that exits at once (sys.exit), past the code that
    # marks the MLflow run KILLED; keep the one the CLI installed (SIGTERM acts as Ctrl-C).
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, runtime_env={"env_vars": dict(_QUIET_ENV)}, **kwargs)
    else:
        # The embedded Ray's processes inherit this process's environment, so the workers'
        # variables travel that way: a job-level runtime_env would cost ~1 s in ray.init
        # (its agent) and keep Ray's prestarted workers from being used (~0.6 s an actor).
        with _environment(_QUIET_ENV):
            ray.init(num_cpus=num_cpus, **kwargs)
    if threading.current_thread() is threading.main_thread() and on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)


def stop_ray(*, exiting: bool = False) -> None:
    """Shut Ray down (idempotent); an embedded Ray without waiting on its autoscaler monitor.

    ``ray.shutdown`` stops the embedded Ray's processes one after another, each with a
    SIGTERM and up to 1 s to leave. The raylet, the GCS and the rest leave in milliseconds;
    the autoscaler monitor answers SIGTERM by reporting its "failure" to the GCS, which is
    already gone, and so is killed only when its second runs out. An embedded cluster's
    monitor keeps no state, so it is killed outright first (about 1 s off every run's
    exit); the rest shut down as Ray does it. A connected driver only disconnects.

    ``exiting``: this process leaves right after (``os._exit``; the CLI's fast exit). The
    embedded cluster lives and dies with the command and holds nothing to keep (the
    checkpoints, MLflow and the logs are written by then), so its processes, and theirs
    (workers, agents), are killed at once, and Ray's own exit handler, which would wait on
    them, is dropped: another 0.3 s (the driver's orderly disconnect). A connected driver
    owns no processes: it disconnects as usual.
    """
    if not ray.is_initialized():
        return
    node = getattr(ray._private.worker, "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    if exiting and processes:
        atexit.unregister(ray.shutdown)
        _kill_trees([info.process.pid for infos in processes.values() for info in infos])
        return
    for info in processes.get("monitor", []):
        process = info.process
        if process.poll() is None:
            process.kill()
            with contextlib.suppress(Exception):
                process.wait(timeout=1)  # reaped, so the shutdown sees it gone
    ray.shutdown()


def _kill_trees(pids: Sequence[int]) -> None:
    """SIGKILL the processes ``pids`` and all their descendants, all at once, without
    waiting (the caller exits; the orphans are reaped by init)."""
    import psutil

    found: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(pid)
            found += [top, *top.children(recursive=True)]  # before any dies: agents reparent
    for process in found:
        with contextlib.suppress(psutil.Error):
            process.kill()


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """``variables`` set in ``os.environ`` inside the block (what the user set wins), then
    the environment as it was."""
    added = {k: v for k, v in variables.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def worker_accelerator(resources: ResourcesConfig, gpu_ids: Sequence[Any]) -> str:
    """DeepSpeed's accelerator for one worker (``cuda`` or ``cpu``), from what Ray gave it.

    A recipe that asks for GPUs (``gpus_per_worker > 0``) trains on CUDA, and Ray must have
    assigned this worker some (``gpu_ids``, i.e. ``ray.get_gpu_ids()``); one that asks for
    none trains on the CPU, even on a GPU node. The driver's hardware plays no part.
    """
    device = resources.device
    if device == "cuda" and not gpu_ids:
        raise UsageError(
            f"resources.gpus_per_worker is {resources.gpus_per_worker}, but Ray gave this "
            "worker no GPU: check the cluster's GPU resources (ray status)"
        )
    return device


def _select_accelerator(name: str) -> None:
    """Make ``name`` DeepSpeed's accelerator in this process; it must happen before
    DeepSpeed is imported (it picks one at import time and keeps it)."""
    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    chosen = getattr(real, "ds_accelerator", None)
    if chosen is not None and chosen.device_name() != name:
        raise UsageError(
            f"DeepSpeed was imported with the {chosen.device_name()} accelerator before "
            f"this worker chose {name}"
        )
    os.environ["DS_ACCELERATOR"] = name


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Latest progress of a job, written by rank 0, read by the driver."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}

    def update(self, progress: dict[str, Any]) -> None:
        self.latest = progress

    def get(self) -> dict[str, Any]:
        return self.latest

    def finish(self, summary: dict[str, Any]) -> None:
        """Rank 0's return value: the job's summary."""
        self.summary: dict[str, Any] | None = summary

    def result(self) -> dict[str, Any] | None:
        """The summary rank 0 returned, or None while (or if) it has not."""
        return getattr(self, "summary", None)


def worker_node_id(rank: int) -> str:
    """This worker's name in MLflow's system metrics: its rank and its Ray node (the first
    8 hex digits of the node id), e.g. ``rank1-1a2b3c4d``."""
    from orchestrator.tracking.system import node_id_of

    return node_id_of(rank, ray.get_runtime_context().get_node_id()[:8])


def run_rank(config: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Train one job on this rank (``torch.distributed`` already set up): the one per-rank
    entry of both launchers, a Ray Train worker (:func:`_worker_entry`) and a worker-group
    actor (:mod:`orchestrator.cluster.workers`). Returns the loop's summary.

    ``config`` is :meth:`JobSpec.worker_config` plus ``progress`` (the job's
    :class:`ProgressBoard`, or None)."""
    entered = time.time()  # rank 0's start-up marks travel back in the summary
    from orchestrator.envrefs import resolve_env_refs
    from orchestrator.recipe.loader import load_recipe_text

    # ${env:NAME} references resolve here, from this worker's environment
    recipe = load_recipe_text(config["recipe_yaml"], name="recipe.yaml")
    _select_accelerator(worker_accelerator(recipe.resources, ray.get_gpu_ids()))
    from orchestrator.engine.loop import WorkerContext, train  # imports DeepSpeed

    marks = {"worker.entry": entered, "worker.imported": time.time()}

    board = config.get("progress")
    last = [0.0]

    def report(progress: dict[str, Any]) -> None:
        now = time.monotonic()
        if board is not None and (now - last[0] > 0.25 or progress["step"] == progress["total"]):
            last[0] = now
            board.update.remote(progress)

    ctx = WorkerContext(
        run_dir=Path(config["run_dir"]),
        rank=rank,
        world_size=world_size,
        tracking_uri=resolve_env_refs(config.get("tracking_uri")),
        run_id=config.get("run_id"),
        resume_step=config.get("resume_step"),
        on_progress=report,
        node_id=worker_node_id(rank),
        marks=marks,
    )
    summary = train(recipe, ctx)
    if board is not None and ctx.rank == 0:  # the job's result travels back as a value
        ray.get(board.finish.remote(summary))
    return summary


def _worker_entry(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs (``resources.launcher: ray_train``)."""
    import ray.train

    context = ray.train.get_context()
    run_rank(config, context.get_world_rank(), context.get_world_size())


def make_trainer(recipe: Recipe, worker_config: dict[str, Any], *, progress: Any = None) -> Any:
    """A ready-to-``fit`` TorchTrainer for one job; ``worker_config`` is
    :meth:`JobSpec.worker_config` (plain data every worker receives)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res, run_dir = recipe.resources, Path(worker_config["run_dir"])
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        per_worker["GPU"] = res.gpus_per_worker
    if res.memory_per_worker_gb:
        per_worker["memory"] = res.memory_per_worker_gb * 2**30
    return TorchTrainer(
        _worker_entry,
        train_loop_config={**worker_config, "progress": progress},
        torch_config=TorchConfig(backend="nccl" if res.device == "cuda" else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=res.workers,
            use_gpu=res.device == "cuda",
            resources_per_worker=per_worker,
            placement_strategy=res.placement,
            accelerator_type=res.accelerator_type,
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(RunDir(run_dir).ray.resolve()),
            failure_config=FailureConfig(max_failures=res.max_restarts),
        ),
    )
