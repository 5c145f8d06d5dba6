"""Refuse, before launching anything, jobs whose resources can never fit the connected cluster.

"Never" means: with every node empty, no placement of the job's worker bundles
satisfies its strategy. (A job that fits but not right now is Ray's to queue.)
Nodes are described by their *total* resources (``ray.nodes()``), so a busy
cluster does not cause a refusal.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import UsageError

GiB = 2**30


class ResourceFitError(UsageError):
    """The recipe asks for more than the target cluster has: exit 2."""


def bundle_of(resources: Any) -> dict[str, float]:
    """The Ray resources one worker asks for (mirrors ``launch.make_trainer``)."""
    bundle = {"CPU": float(resources.cpus_per_worker)}
    if resources.gpus_per_worker:
        bundle["GPU"] = float(resources.gpus_per_worker)
    if resources.memory_per_worker_gb:
        bundle["memory"] = float(resources.memory_per_worker_gb) * GiB
    if resources.accelerator_type:
        bundle[f"accelerator_type:{resources.accelerator_type}"] = 0.001
    return bundle


def _fits(bundle: Mapping[str, float], node: Mapping[str, float], count: int = 1) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v * count for k, v in bundle.items())


def _how_many(bundle: Mapping[str, float], node: Mapping[str, float]) -> int:
    counts = [int((node.get(k, 0.0) + 1e-9) // v) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 0


def _fmt(bundle: Mapping[str, float]) -> str:
    parts = []
    for k, v in bundle.items():
        if k == "memory":
            parts.append(f"memory={v / GiB:g}GiB")
        elif k.startswith("accelerator_type:"):
            parts.append(k)
        else:
            parts.append(f"{k}={v:g}")
    return ", ".join(parts)


def fit_problems(
    resources: Any, nodes: Iterable[Mapping[str, float]], name: str = "job"
) -> list[str]:
    """Why ``resources`` can never be placed on a cluster of ``nodes`` (empty list: it can)."""
    nodes = [dict(n) for n in nodes]
    bundle = bundle_of(resources)
    workers = int(resources.workers)
    strategy = resources.placement
    where = f"{name}: resources"
    if not nodes:
        return [f"{where}: the cluster has no alive nodes"]
    missing = [k for k in bundle if not any(n.get(k, 0.0) > 0 for n in nodes)]
    if missing:
        kinds = ", ".join(missing)
        fix = (
            "set resources.gpus_per_worker: 0 for CPU, or use a cluster with GPUs"
            if "GPU" in missing
            else "drop resources.accelerator_type or pick one the cluster has"
            if any(k.startswith("accelerator_type:") for k in missing)
            else "lower the request"
        )
        return [f"{where}: no node of the cluster has {kinds} ({fix})"]
    per_node = [_how_many(bundle, n) for n in nodes]
    biggest = max(per_node)
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    if biggest == 0:
        return [
            f"{where}: one worker needs {_fmt(bundle)} but no single node has that much "
            f"(largest node: {_fmt({k: max(n.get(k, 0.0) for n in nodes) for k in bundle})}); "
            "lower resources.cpus_per_worker / gpus_per_worker / memory_per_worker_gb"
        ]
    if strategy == "STRICT_PACK" and biggest < workers:
        return [
            f"{where}: placement STRICT_PACK needs all {workers} workers ({_fmt(bundle)} each) "
            f"on one node, but the largest node holds {biggest}; use placement PACK, or "
            f"resources.workers <= {biggest}"
        ]
    if strategy == "STRICT_SPREAD":
        usable = sum(1 for c in per_node if c >= 1)
        if usable < workers:
            return [
                f"{where}: placement STRICT_SPREAD needs {workers} distinct nodes, the cluster "
                f"has {usable} that fit a worker; use PACK or SPREAD, or resources.workers <= "
                f"{usable}"
            ]
        return []
    if sum(per_node) < workers:
        return [
            f"{where}: {workers} workers x ({_fmt(bundle)}) never fit: the whole cluster holds "
            f"{sum(per_node)} such workers (total CPU {total_cpu:g}); lower resources.workers "
            f"to {sum(per_node)} or the per-worker request"
        ]
    return []


def jobs_at_once(resources: Any, nodes: Iterable[Mapping[str, float]]) -> int:
    """How many jobs of ``resources`` the cluster of ``nodes`` holds at the same time (at
    least 1): its worker slots over the workers one job needs (per node for STRICT_PACK)."""
    bundle = bundle_of(resources)
    workers = max(1, int(resources.workers))
    per_node = [_how_many(bundle, n) for n in nodes]
    if resources.placement == "STRICT_PACK":
        return max(1, sum(c // workers for c in per_node))
    return max(1, sum(per_node) // workers)


@dataclass(frozen=True)
class NodeInfo:
    """One alive node of the cluster: its Ray node id, host name and total resources."""

    node_id: str
    host: str
    resources: dict[str, float]


def alive_nodes() -> list[NodeInfo]:
    """The alive nodes of the connected Ray cluster."""
    import ray

    return [
        NodeInfo(
            str(n["NodeID"]),
            str(n.get("NodeManagerHostname") or n.get("NodeManagerAddress") or "?"),
            dict(n.get("Resources", {})),
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected Ray cluster."""
    return [n.resources for n in alive_nodes()]


def fit_without(resources: Any, nodes: Sequence[NodeInfo], exclude: Collection[str]) -> list[str]:
    """Why ``resources`` can never be placed on the alive ``nodes`` outside ``exclude``
    (node ids); an empty list: it can."""
    left = [n.resources for n in nodes if n.node_id not in exclude]
    if not left:
        return ["the cluster has no other alive node (a single node, such as the embedded Ray)"]
    return fit_problems(resources, left, name="the other nodes")


def check_variants(variants: Iterable[Any], nodes: list[dict[str, float]] | None = None) -> None:
    """Raise ``ResourceFitError`` naming every variant that can never fit."""
    nodes = cluster_nodes() if nodes is None else nodes
    problems: list[str] = []
    seen: set[str] = set()
    for v in variants:
        key = v.recipe.resources.model_dump_json()
        if key in seen:
            continue
        seen.add(key)
        problems += fit_problems(v.recipe.resources, nodes, name=v.name)
    if problems:
        raise ResourceFitError("\n".join(problems))
