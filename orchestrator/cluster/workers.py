"""Regimen's own worker group: one Ray actor per rank, warm across jobs.

A :class:`WorkerGroup` reserves a placement group (one bundle per rank,
``fit.bundle_of``, strategy ``resources.placement``) and starts one actor per bundle.
Each actor chooses DeepSpeed's accelerator in its constructor and, in ``setup``, imports
the engine (torch, DeepSpeed, transformers, MLflow) once and joins the group's
``torch.distributed`` world (gloo on the CPU, NCCL on CUDA; rank 0's node IP and a free
port there), in a background start that overlaps the driver opening the MLflow run. It runs
one job at a time (:meth:`WorkerGroup.run`), every rank calling ``launch.run_rank``,
the same per-rank entry as the Ray Train launcher.

A group that saw a failure (a rank raised, an actor died) is torn down, never reused: a
gloo group with a collective in flight is broken. :class:`WorkerJob` applies the
failure policy (:class:`FailurePolicy`, a decision per failure, as Ray Train v2 does):
while ``resources.max_restarts`` allows, a fresh group reruns the job, whose loop resumes
from the run directory's latest complete checkpoint. A job stopped because one rank's
hardware looks faulty (:class:`~orchestrator.errors.BadWorker`: the spike guard's
non-reproducible anomalies) restarts the same way on a group placed without that rank's
node (a ``ray.io/node-id`` label selector), if the other nodes can hold it; else it fails
saying why. A :class:`WorkerPool` keeps groups
that finished cleanly, so a sweep's variants pay process start, imports and process-group
setup once per concurrency slot.
"""

from __future__ import annotations

import contextlib
import enum
import re
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from orchestrator.cluster.fit import NodeInfo, alive_nodes, bundle_of, fit_without
from orchestrator.errors import BadWorker, RegimenError, UsageError
from orchestrator.rundir import RunDir

PoolKey = tuple[int, tuple[tuple[str, float], ...], str, str]
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node carries its node id as this label


class WorkerGroupError(RegimenError):
    """A job failed on the worker group. ``worker_failures`` (rank -> error) holds the
    first failure first, as Ray Train's errors do (``controller._root_cause`` reads it)."""

    def __init__(self, message: str, worker_failures: Mapping[int, BaseException]) -> None:
        super().__init__(message)
        self.worker_failures = dict(worker_failures)


class WorkerDied(RegimenError):
    """A rank's actor process ended without an answer (``os._exit``, an OOM kill, a lost node)."""


class Cancelled(RegimenError):
    """The group was killed on purpose (a sweep interrupted, Ctrl-C, SIGTERM)."""


# -- pure placement logic -------------------------------------------------------------------
@dataclass(frozen=True)
class RankSlot:
    """Where one actor sits in the job's world, and what its process must see."""

    rank: int
    local_rank: int
    local_world_size: int
    node_rank: int
    cuda_visible_devices: str | None
    cuda_index: int | None


def plan_ranks(members: Sequence[tuple[str, Sequence[Any]]], device: str) -> list[RankSlot]:
    """Each actor's slot, in actor order, from ``(node id, GPU ids Ray gave it)`` per actor.

    Ranks go node by node (nodes in order of their first actor, so actor 0 is rank 0), and
    within a node by GPU id. On CUDA, all actors of a node see the node's GPUs of the group
    (``CUDA_VISIBLE_DEVICES`` = their union, so NCCL can use peer-to-peer), and an actor's
    CUDA index is the place of its GPU in that list. DeepSpeed trains on ``cuda:LOCAL_RANK``
    (``get_accelerator().set_device(local_rank)`` in its engine), so that index must equal
    the local rank: one whole GPU per worker. Anything else is refused (``UsageError``)
    rather than silently training two ranks on one GPU.
    """
    nodes: list[str] = []
    for node, _ in members:
        if node not in nodes:
            nodes.append(node)
    order = sorted(
        range(len(members)),
        key=lambda i: (nodes.index(members[i][0]), sorted(int(g) for g in members[i][1]), i),
    )
    slots: dict[int, RankSlot] = {}
    for rank, i in enumerate(order):
        node = members[i][0]
        same_node = [j for j in order if members[j][0] == node]
        visible: str | None = None
        index: int | None = None
        if device == "cuda":
            gpus = sorted({int(g) for j in same_node for g in members[j][1]})
            mine = sorted(int(g) for g in members[i][1])
            if len(mine) != 1 or len(gpus) != len(same_node):
                raise UsageError(
                    "the worker group trains each rank on one whole GPU: set "
                    "resources.gpus_per_worker: 1 (or resources.launcher: ray_train)"
                )
            visible = ",".join(str(g) for g in gpus)
            index = gpus.index(mine[0])
        slots[i] = RankSlot(
            rank=rank,
            local_rank=same_node.index(i),
            local_world_size=len(same_node),
            node_rank=nodes.index(node),
            cuda_visible_devices=visible,
            cuda_index=index,
        )
    return [slots[i] for i in range(len(members))]


def rank_env(slot: RankSlot, world_size: int, master_addr: str, master_port: int) -> dict[str, str]:
    """The environment one rank's process needs before ``torch.distributed`` and DeepSpeed
    start (the variables ``torchrun`` would set)."""
    env = {
        "RANK": str(slot.rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(slot.local_rank),
        "LOCAL_WORLD_SIZE": str(slot.local_world_size),
        "NODE_RANK": str(slot.node_rank),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }
    if slot.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.cuda_visible_devices
    return env


def death_reason(text: str) -> str:
    """One line of Ray's (multi-line) actor-death message: the Python error that killed
    the actor when there is one (a constructor that raised), else the first line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return (errors[-1] if errors else lines[0] if lines else "")[:500]


def node_selector(exclude: Collection[str]) -> dict[str, str]:
    """A bundle label selector that keeps a bundle off the nodes ``exclude`` (node ids)."""
    return {NODE_ID_LABEL: "!in(" + ",".join(sorted(exclude)) + ")"}


def pool_key(resources: Any) -> PoolKey:
    """Groups are interchangeable between jobs with equal keys: same world size, same
    per-worker resources, same placement strategy, same device."""
    bundle = tuple(sorted(bundle_of(resources).items()))
    return (int(resources.workers), bundle, str(resources.placement), str(resources.device))


class Decision(enum.Enum):
    """What the failure policy says to do with a failed job."""

    RESTART = "restart"
    RESTART_WITHOUT_NODE = "restart_without_node"  # a fresh group off the bad rank's node
    RAISE = "raise"


@dataclass(frozen=True)
class FailurePolicy:
    """Restart a failed job on a fresh group while ``max_restarts`` allows; a cancelled
    job is never restarted. A job a bad worker stopped (:class:`BadWorker`) restarts only
    without that worker's node, and only where the other nodes can hold it: on the same
    nodes its deliberate stop would stand. Every restart counts toward ``max_restarts``."""

    max_restarts: int

    def decide(
        self, error: BaseException, restarts_done: int, *, fits_without_node: bool = False
    ) -> Decision:
        """The decision for ``error``, after ``restarts_done`` restarts of this job;
        ``fits_without_node``: the job fits the cluster without the bad worker's node."""
        if isinstance(error, Cancelled) or restarts_done >= self.max_restarts:
            return Decision.RAISE
        if isinstance(error, BadWorker):
            return Decision.RESTART_WITHOUT_NODE if fits_without_node else Decision.RAISE
        return Decision.RESTART


# -- the actors -----------------------------------------------------------------------------
@ray.remote(max_restarts=0)
class RankWorker:
    """One rank's process. It picks DeepSpeed's accelerator at once (before DeepSpeed is
    imported) and, in :meth:`setup`, imports the engine (torch, DeepSpeed, transformers,
    MLflow) once for every job it will run."""

    def __init__(self, resources: Any) -> None:
        from orchestrator.cluster.launch import _select_accelerator, worker_accelerator

        _select_accelerator(worker_accelerator(resources, ray.get_gpu_ids()))
        self.rank = -1
        self.world_size = 0
        self.jobs_run = 0

    def describe(self) -> tuple[str, list[Any], int]:
        """(node id, GPU ids Ray gave this actor, process id)."""
        import os

        return ray.get_runtime_context().get_node_id(), list(ray.get_gpu_ids()), os.getpid()

    def address(self) -> tuple[str, int]:
        """This node's IP and a port free on it: where rank 0 hosts the process group."""
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            port = int(s.getsockname()[1])
        return ray.util.get_node_ip_address(), port

    def setup(self, env: dict[str, str], backend: str, cuda_index: int | None) -> None:
        """Import the engine and join the group's ``torch.distributed`` world (all ranks
        call this together). The environment comes first: CUDA reads
        ``CUDA_VISIBLE_DEVICES`` once, when something first touches it."""
        import os

        os.environ.update(env)
        import torch

        import orchestrator.engine.loop  # noqa: F401  (DeepSpeed)

        # what every job's first step would import otherwise: the model classes' base
        # (transformers.modeling_utils, seconds) and rank 0's MLflow client
        with contextlib.suppress(ImportError):  # vision-only installs have no transformers
            import transformers.modeling_utils  # noqa: F401
        with contextlib.suppress(ImportError):
            import mlflow.tracking  # noqa: F401
        if cuda_index is not None:
            torch.cuda.set_device(cuda_index)
        from orchestrator.distributed import join_world

        join_world(backend, int(env["RANK"]), int(env["WORLD_SIZE"]))
        self.rank, self.world_size = int(env["RANK"]), int(env["WORLD_SIZE"])

    def run(self, config: dict[str, Any]) -> dict[str, Any]:
        """Run one job on this rank: ``launch.run_rank``."""
        import gc

        from orchestrator.cluster.launch import run_rank

        if self.jobs_run:  # the last job's engine (released) goes now, not on its way out
            gc.collect()
        self.jobs_run += 1
        return run_rank(config, self.rank, self.world_size)

    def memory(self) -> int:
        """This process's resident memory in bytes (its peak where psutil is missing)."""
        try:
            import psutil
        except ImportError:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        return int(psutil.Process().memory_info().rss)


# -- the group ------------------------------------------------------------------------------
class WorkerGroup:
    """One actor per rank in a placement group; runs one job at a time.

    Creating it starts the actors and, in a background thread, their imports and the
    process group, while the driver goes on (opening the MLflow run); :meth:`run` waits
    for that. After a failure, or :meth:`shutdown`, the group is unusable.
    """

    def __init__(self, resources: Any, exclude_nodes: Collection[str] = ()) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.resources = resources
        self.key = pool_key(resources)
        self.device = str(resources.device)
        self.exclude_nodes = frozenset(exclude_nodes)  # node ids no bundle may land on
        bundle = bundle_of(resources)
        workers = int(resources.workers)
        self._lock = threading.Lock()
        self._dead = False
        selector = [node_selector(self.exclude_nodes)] * workers if self.exclude_nodes else None
        self.pg = placement_group(
            [dict(bundle)] * workers, strategy=resources.placement, bundle_label_selector=selector
        )
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")}
        self.actors = [
            RankWorker.options(  # type: ignore[attr-defined]
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                memory=bundle.get("memory"),
                resources=custom or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i
                ),
            ).remote(resources)
            for i in range(workers)
        ]
        self.pids: list[int] = []
        self.nodes: list[str] = []  # each actor's Ray node id, in actor order
        self.ranks: list[int] = []
        self._start_error: BaseException | None = None
        # placement, imports and the process group proceed while the driver goes on
        self._starting = threading.Thread(target=self._start, name="worker-group", daemon=True)
        self._starting.start()

    @property
    def healthy(self) -> bool:
        """Whether the group may run a(nother) job."""
        return not self._dead

    def _call(self, method: str, args: Sequence[Sequence[Any]]) -> list[Any]:
        refs = [getattr(a, method).remote(*args[i]) for i, a in enumerate(self.actors)]
        return self._gather(refs)

    def _gather(self, refs: list[Any]) -> list[Any]:
        """Every actor's answer, in actor order; on the first failure, kill the group and
        raise it (a peer's death, found within a moment, is named before the collective
        errors it caused on the other ranks)."""
        index = {ref: i for i, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                error = self._outcome(ref, index[ref], results)
                if error is not None:
                    self._fail(*self._first_cause(index[ref], error, pending, index))
            if self._dead and pending:  # killed from another thread (cancel, Ctrl-C)
                raise WorkerGroupError("the worker group was stopped", {-1: Cancelled("stopped")})
        return [results[i] for i in range(len(refs))]

    def _outcome(self, ref: Any, i: int, results: dict[int, Any]) -> BaseException | None:
        from ray.exceptions import RayActorError, RayTaskError

        try:
            results[i] = ray.get(ref)
        except RayTaskError as exc:
            return exc.cause if isinstance(exc.cause, BaseException) else exc
        except RayActorError as exc:
            return self._death(self._rank(i), exc)
        return None

    def _first_cause(
        self, i: int, error: BaseException, pending: list[Any], index: dict[Any, int]
    ) -> tuple[int, BaseException]:
        if isinstance(error, WorkerDied) or not pending:
            return self._rank(i), error
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=3.0)
        for ref in done:
            other = self._outcome(ref, index[ref], {})
            if isinstance(other, WorkerDied):
                return self._rank(index[ref]), other
        return self._rank(i), error

    def _rank(self, i: int) -> int:
        return self.ranks[i] if i < len(self.ranks) else i

    def _death(self, rank: int, exc: BaseException) -> BaseException:
        if self._dead:  # we killed it ourselves
            return Cancelled("the worker group was stopped")
        return WorkerDied(
            f"rank {rank}'s worker process died (exited, killed for memory, or its node was "
            f"lost): {death_reason(str(exc)) or type(exc).__name__}"
        )

    def _fail(self, rank: int, error: BaseException) -> None:
        cancelled = self._dead
        self.shutdown()
        if cancelled and not isinstance(error, Cancelled):
            error = Cancelled("the worker group was stopped")
        raise WorkerGroupError(f"rank {rank}: {type(error).__name__}: {error}", {rank: error})

    def _start(self) -> None:
        try:
            described = self._call("describe", [()] * len(self.actors))
            self.pids = [pid for _, _, pid in described]
            self.nodes = [node for node, _, _ in described]
            slots = plan_ranks([(node, gpus) for node, gpus, _ in described], self.device)
            head = next(i for i, s in enumerate(slots) if s.rank == 0)
            addr, port = ray.get(self.actors[head].address.remote())
            backend = "nccl" if self.device == "cuda" else "gloo"
            world = len(self.actors)
            self._call(
                "setup",
                [(rank_env(s, world, addr, port), backend, s.cuda_index) for s in slots],
            )
            self.ranks = [s.rank for s in slots]
        except BaseException as exc:
            self.shutdown()
            self._start_error = exc

    def start(self) -> None:
        """Wait until the actors are placed, have imported the engine and joined one
        ``torch.distributed`` world; raise what stopped that (the group is then shut down)."""
        self._starting.join()
        if self._start_error is not None:
            raise self._start_error

    def run(self, config: dict[str, Any]) -> dict[str, Any]:
        """Run one job (every rank calls ``run_rank``); rank 0's summary. Raises
        :class:`WorkerGroupError` (the group is then shut down) if any rank fails."""
        if self._dead:
            raise RegimenError("this worker group was shut down; start a new one")
        self.start()
        refs = [a.run.remote(config) for a in self.actors]
        results = self._gather(refs)
        return results[self.ranks.index(0)]

    def node_of(self, rank: int) -> str | None:
        """The Ray node id ``rank`` ran on (None: the group never got that far)."""
        if rank not in self.ranks or len(self.nodes) != len(self.ranks):
            return None
        return self.nodes[self.ranks.index(rank)]

    def memory(self) -> list[int]:
        """Resident memory of each actor, in actor order (bytes)."""
        return list(ray.get([a.memory.remote() for a in self.actors]))

    def shutdown(self) -> None:
        """Kill the actors and free the placement group at once (idempotent, any thread)."""
        from ray.util.placement_group import remove_placement_group

        with self._lock:
            was_dead, self._dead = self._dead, True
            if was_dead:
                return
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(self.pg)


class WorkerPool:
    """Warm groups kept between jobs, keyed by :func:`pool_key` (thread-safe). A node a job
    found bad (:meth:`exclude`) is kept out of every later group of the pool, so a sweep's
    other variants avoid it too."""

    def __init__(self) -> None:
        self._idle: dict[PoolKey, list[WorkerGroup]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._excluded: set[str] = set()

    @property
    def excluded(self) -> frozenset[str]:
        """The node ids no new group of this pool goes to."""
        with self._lock:
            return frozenset(self._excluded)

    def exclude(self, node_id: str) -> None:
        """Keep later groups off ``node_id``; idle groups with a rank there are shut down."""
        with self._lock:
            self._excluded.add(node_id)
            there = [g for gs in self._idle.values() for g in gs if node_id in g.nodes]
            self._idle = {k: [g for g in gs if g not in there] for k, gs in self._idle.items()}
        for group in there:
            group.shutdown()

    def acquire(self, resources: Any) -> WorkerGroup:
        """An idle group for ``resources`` if one is kept, else a new one (starting).

        A new group first frees the idle groups of other shapes: their placement groups
        hold resources the new one may need (two shapes on a small local Ray would
        otherwise wait on each other for ever)."""
        key = pool_key(resources)
        with self._lock:
            idle = self._idle.get(key) or []
            while idle:
                group = idle.pop()
                if group.healthy:
                    return group
            others = [g for k, gs in self._idle.items() if k != key for g in gs]
            self._idle = {k: gs for k, gs in self._idle.items() if k == key}
        for group in others:
            group.shutdown()
        return self._new(resources)

    def _new(self, resources: Any) -> WorkerGroup:
        return WorkerGroup(resources, self.excluded)

    def release(self, group: WorkerGroup) -> None:
        """Keep ``group`` for the next job if it finished cleanly (and has no rank on an
        excluded node), else shut it down."""
        with self._lock:
            if group.healthy and not self._closed and not self._excluded & set(group.nodes):
                self._idle.setdefault(group.key, []).append(group)
                return
        group.shutdown()

    def idle(self) -> list[WorkerGroup]:
        """The groups kept now."""
        with self._lock:
            return [g for groups in self._idle.values() for g in groups]

    def shutdown(self) -> None:
        """Shut every kept group down; later releases shut theirs down too."""
        with self._lock:
            self._closed = True
            groups = [g for gs in self._idle.values() for g in gs]
            self._idle.clear()
        for group in groups:
            group.shutdown()


@dataclass(frozen=True)
class BadNode:
    """The node of the rank a :class:`BadWorker` stop (``fault``) named, and whether the
    job can go on without it: ``problems`` says why not (empty: the other nodes can hold
    the job)."""

    fault: BadWorker
    node_id: str | None
    host: str | None
    problems: tuple[str, ...]

    def where(self) -> str:
        """The node in words, e.g. ``node 1a2b3c4d (host gpu-7)``."""
        if self.node_id is None:
            return f"rank {self.fault.rank}'s node"
        return f"node {self.node_id[:8]} (host {self.host or '?'})"


class WorkerJob:
    """One job on worker groups, with restarts: :meth:`run` blocks; :meth:`stop` (any
    thread) kills the group in use at once.

    ``new_group(exclude_nodes)`` makes each fresh group; ``nodes`` lists the cluster's alive
    nodes (what a restart without a bad node must fit on)."""

    def __init__(
        self,
        resources: Any,
        group: WorkerGroup | None = None,
        *,
        new_group: Callable[[frozenset[str]], WorkerGroup] | None = None,
        nodes: Callable[[], Sequence[NodeInfo]] = alive_nodes,
    ) -> None:
        self.resources = resources
        self.policy = FailurePolicy(int(resources.max_restarts))
        self._new_group = new_group or (lambda exclude: WorkerGroup(resources, exclude))
        self._nodes = nodes
        self.group = group if group is not None else self._new_group(frozenset())
        self.restarts = 0
        self.excluded: dict[str, BadNode] = {}  # node id -> why: no group of this job goes there
        self._stopped = threading.Event()

    def run(
        self, config: dict[str, Any], on_restart: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Run the job, restarting on a fresh group while the policy says so.
        ``on_restart`` hears of each restart without a node (the facts, as a dict)."""
        while True:
            try:
                return self.group.run(config)
            except WorkerGroupError as exc:
                error = next(iter(exc.worker_failures.values()), exc)
                if self._stopped.is_set():
                    error = Cancelled("stopped")
                bad = self._bad_node(error) if isinstance(error, BadWorker) else None
                decision = self.policy.decide(
                    error, self.restarts, fits_without_node=bad is not None and not bad.problems
                )
                if decision is Decision.RAISE:
                    if bad is not None:
                        raise self._not_moved(exc, bad) from exc
                    raise
                self.restarts += 1
                if decision is Decision.RESTART_WITHOUT_NODE and bad is not None:
                    self._move_off(bad, config, on_restart)
                self.group = self._new_group(frozenset(self.excluded))
                if self._stopped.is_set():  # stopped while the new group was made
                    self.group.shutdown()
                    raise

    def _bad_node(self, fault: BadWorker) -> BadNode:
        node = self.group.node_of(fault.rank)
        if node is None:
            return BadNode(fault, None, None, ("the worker group does not know its node",))
        nodes = list(self._nodes())
        host = next((n.host for n in nodes if n.node_id == node), None)
        problems = fit_without(self.resources, nodes, {*self.excluded, node})
        return BadNode(fault, node, host, tuple(problems))

    def _move_off(
        self,
        bad: BadNode,
        config: Mapping[str, Any],
        on_restart: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        """Exclude ``bad``'s node from every later group and lift the job's stop record
        (the stop was about that node; the restart resumes from the latest checkpoint)."""
        if bad.node_id is not None:
            self.excluded[bad.node_id] = bad
        if config.get("run_dir"):
            RunDir(config["run_dir"]).clear_stopped()
        if on_restart is not None:
            on_restart(
                {
                    "rank": bad.fault.rank,
                    "node_id": bad.node_id,
                    "host": bad.host,
                    "step": bad.fault.step,
                    "restart": self.restarts,
                    "max_restarts": self.policy.max_restarts,
                    "excluded_nodes": sorted(self.excluded),
                }
            )

    def _not_moved(self, exc: WorkerGroupError, bad: BadNode) -> WorkerGroupError:
        """The failure as it was, plus why no restart without the bad node happened."""
        if self.restarts >= self.policy.max_restarts:
            n = self.policy.max_restarts
            why = f"resources.max_restarts is {n} and {self.restarts} restart(s) are done"
        else:
            why = "; ".join(bad.problems)
        fault = bad.fault
        note = BadWorker(
            f"{fault} No automatic restart without {bad.where()}: {why}.", fault.rank, fault.step
        )
        failed = next(iter(exc.worker_failures), fault.rank)
        return WorkerGroupError(f"{exc} (not restarted: {why})", {failed: note})

    def stop(self) -> None:
        """Kill the current group; :meth:`run` raises instead of restarting."""
        self._stopped.set()
        self.group.shutdown()
