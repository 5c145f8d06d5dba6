"""A job a bad worker stopped restarts without that worker's node (issue 17): the failure
policy's decisions, the label selector that keeps bundles off excluded nodes, the check
that the other nodes can hold the job, and the restart loop (fake groups: no Ray here)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
from ray._private.label_utils import validate_label_selector

from orchestrator.cluster.fit import NodeInfo, fit_without
from orchestrator.cluster.workers import (
    Cancelled,
    Decision,
    FailurePolicy,
    WorkerDied,
    WorkerGroupError,
    WorkerJob,
    node_selector,
    pool_key,
)
from orchestrator.control.controller import _root_cause
from orchestrator.errors import BadWorker
from orchestrator.recipe.sections import ResourcesConfig
from orchestrator.rundir import RunDir, Stopped

HEAD, SECOND = "a" * 56, "b" * 56  # Ray node ids are 56 hex digits
TWO_NODES = [
    NodeInfo(HEAD, "head-host", {"CPU": 2.0}),
    NodeInfo(SECOND, "second-host", {"CPU": 2.0}),
]


def _fault(rank: int = 1, step: int = 9) -> BadWorker:
    return BadWorker(f"spike guard: 1 anomalies on rank {rank} did not reproduce", rank, step)


def test_policy_restarts_a_bad_worker_s_job_only_without_its_node() -> None:
    policy = FailurePolicy(max_restarts=1)
    assert policy.decide(_fault(), 0, fits_without_node=True) is Decision.RESTART_WITHOUT_NODE
    assert policy.decide(_fault(), 0, fits_without_node=False) is Decision.RAISE  # the stop stands
    assert policy.decide(_fault(), 1, fits_without_node=True) is Decision.RAISE  # budget used
    assert policy.decide(Cancelled("stopped"), 0, fits_without_node=True) is Decision.RAISE
    assert policy.decide(WorkerDied("x"), 0, fits_without_node=True) is Decision.RESTART
    assert FailurePolicy(0).decide(_fault(), 0, fits_without_node=True) is Decision.RAISE


def test_node_selector_is_valid_ray_syntax_for_one_or_several_nodes() -> None:
    assert node_selector({SECOND}) == {"ray.io/node-id": f"!in({SECOND})"}
    both = node_selector({SECOND, HEAD})
    assert both == {"ray.io/node-id": f"!in({HEAD},{SECOND})"}
    assert validate_label_selector(both) is None
    assert validate_label_selector(node_selector({SECOND})) is None


def test_fit_without_the_bad_node() -> None:
    two = ResourcesConfig(workers=2, cpus_per_worker=1, placement="SPREAD")
    assert fit_without(two, TWO_NODES, {SECOND}) == []  # the head holds both workers
    (alone,) = fit_without(two, TWO_NODES[:1], {HEAD})
    assert "no other alive node" in alone
    four = ResourcesConfig(workers=4, cpus_per_worker=1)
    (small,) = fit_without(four, TWO_NODES, {SECOND})
    assert "never fit" in small
    spread = ResourcesConfig(workers=2, placement="STRICT_SPREAD")
    assert "STRICT_SPREAD" in fit_without(spread, TWO_NODES, {SECOND})[0]


def test_bad_worker_travels_as_itself() -> None:
    back = pickle.loads(pickle.dumps(_fault(rank=3, step=11)))
    assert isinstance(back, BadWorker) and (back.rank, back.step) == (3, 11)
    assert str(back) == "spike guard: 1 anomalies on rank 3 did not reproduce"


class NodeGroup:
    """A fake worker group whose ranks sit on given nodes; runs ``outcomes`` in turn."""

    def __init__(self, res: Any, nodes: list[str], outcomes: list[Any], exclude: Any = ()):
        self.key = pool_key(res)
        self.nodes, self.outcomes, self.exclude = nodes, list(outcomes), frozenset(exclude)
        self.dead = False

    @property
    def healthy(self) -> bool:
        return not self.dead

    def node_of(self, rank: int) -> str | None:
        return self.nodes[rank] if rank < len(self.nodes) else None

    def run(self, config: dict[str, Any]) -> dict[str, Any]:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            self.dead = True
            raise WorkerGroupError(str(outcome), {0: outcome})  # rank 0 failed first
        return dict(outcome)

    def shutdown(self) -> None:
        self.dead = True


def _stopped_run(tmp_path: Path) -> RunDir:
    rd = RunDir(tmp_path / "run").create()
    rd.write_stopped(Stopped(step=9, reason="spike guard: ...", bad_rank=1))
    return rd


def test_job_restarts_without_the_bad_rank_s_node_and_lifts_the_stop(tmp_path: Path) -> None:
    res = ResourcesConfig(workers=2, cpus_per_worker=1, placement="SPREAD", max_restarts=2)
    rd = _stopped_run(tmp_path)
    first = NodeGroup(res, [HEAD, SECOND], [_fault(rank=1)])
    made: list[NodeGroup] = []

    def new_group(exclude: frozenset[str]) -> NodeGroup:
        outcomes = [WorkerDied("rank 0 died")] if not made else [{"steps": 12}]
        made.append(NodeGroup(res, [HEAD, HEAD], outcomes, exclude))
        return made[-1]

    heard: list[dict[str, Any]] = []
    job = WorkerJob(res, first, new_group=new_group, nodes=lambda: TWO_NODES)  # type: ignore[arg-type]
    assert job.run({"run_dir": str(rd.root)}, heard.append) == {"steps": 12}
    # both later groups (after the bad worker, then after a plain crash) avoid the node
    assert [g.exclude for g in made] == [frozenset({SECOND})] * 2
    assert job.restarts == 2 and list(job.excluded) == [SECOND]
    assert rd.read_stopped() is None  # the stop was about that node
    assert heard == [
        {
            "rank": 1,
            "node_id": SECOND,
            "host": "second-host",
            "step": 9,
            "restart": 1,
            "max_restarts": 2,
            "excluded_nodes": [SECOND],
        }
    ]


def test_on_a_single_node_the_job_fails_saying_why_it_did_not_move(tmp_path: Path) -> None:
    res = ResourcesConfig(workers=1, max_restarts=2)
    rd = _stopped_run(tmp_path)
    made: list[Any] = []
    job = WorkerJob(
        res,
        NodeGroup(res, [HEAD], [_fault(rank=0)]),  # type: ignore[arg-type]
        new_group=lambda ex: made.append(ex) or made[-1],  # type: ignore[arg-type,func-returns-value]
        nodes=lambda: TWO_NODES[:1],
    )
    with pytest.raises(WorkerGroupError) as info:
        job.run({"run_dir": str(rd.root)})
    assert made == [] and job.restarts == 0
    assert rd.read_stopped() is not None  # the deliberate stop stands
    line = _root_cause(info.value)
    assert line.startswith("BadWorker: spike guard: 1 anomalies on rank 0 did not reproduce")
    assert f"No automatic restart without node {HEAD[:8]} (host head-host)" in line
    assert "no other alive node" in line
    assert isinstance(info.value.worker_failures[0], BadWorker)


def test_without_restarts_left_the_job_fails_naming_max_restarts() -> None:
    res = ResourcesConfig(workers=2, cpus_per_worker=1, placement="SPREAD", max_restarts=0)
    job = WorkerJob(
        res,
        NodeGroup(res, [HEAD, SECOND], [_fault(rank=1)]),  # type: ignore[arg-type]
        new_group=lambda ex: pytest.fail("no restart"),
        nodes=lambda: TWO_NODES,
    )
    with pytest.raises(WorkerGroupError) as info:
        job.run({})
    assert "resources.max_restarts is 0 and 0 restart(s) are done" in _root_cause(info.value)
