"""The worker group's pure parts: rank layout and environment, pool keys, failure decisions,
the pool's keeping and eviction, the restart loop (fake groups: no Ray here)."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.cluster.workers import (
    Cancelled,
    Decision,
    FailurePolicy,
    WorkerDied,
    WorkerGroupError,
    WorkerJob,
    WorkerPool,
    death_reason,
    plan_ranks,
    pool_key,
    rank_env,
)
from orchestrator.control.controller import _root_cause
from orchestrator.errors import UsageError
from orchestrator.recipe.sections import ResourcesConfig


def test_cpu_ranks_follow_actor_order_and_count_locally_per_node() -> None:
    slots = plan_ranks([("a", []), ("b", []), ("a", []), ("b", [])], "cpu")
    assert [s.rank for s in slots] == [0, 2, 1, 3]
    assert [s.local_rank for s in slots] == [0, 0, 1, 1]
    assert [s.node_rank for s in slots] == [0, 1, 0, 1]
    assert all(s.local_world_size == 2 for s in slots)
    assert all(s.cuda_visible_devices is None and s.cuda_index is None for s in slots)


def test_cuda_rank_sees_its_nodes_gpus_and_trains_on_cuda_local_rank() -> None:
    """Ray gave actor 0 GPU 3 and actor 1 GPU 1 on one node: both see "1,3"; DeepSpeed
    trains on cuda:LOCAL_RANK, so the actor holding GPU 1 is local rank 0 (and rank 0)."""
    slots = plan_ranks([("n", [3]), ("n", ["1"]), ("m", [0])], "cuda")
    assert [s.rank for s in slots] == [1, 0, 2]
    assert [s.cuda_visible_devices for s in slots] == ["1,3", "1,3", "0"]
    assert [s.cuda_index for s in slots] == [1, 0, 0]
    assert all(s.cuda_index == s.local_rank for s in slots)


@pytest.mark.parametrize(
    "members",
    [
        [("n", [0]), ("n", [0])],  # gpus_per_worker 0.5: two ranks on one GPU
        [("n", [0, 1]), ("n", [2, 3])],  # two GPUs per worker
    ],
)
def test_cuda_layouts_deepspeed_would_misplace_are_refused(members: list[Any]) -> None:
    with pytest.raises(UsageError, match="gpus_per_worker: 1"):
        plan_ranks(members, "cuda")


def test_rank_env_is_what_torchrun_sets() -> None:
    slot = plan_ranks([("n", [0]), ("n", [1])], "cuda")[1]
    env = rank_env(slot, 2, "10.0.0.5", 29511)
    assert env == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "NODE_RANK": "0",
        "MASTER_ADDR": "10.0.0.5",
        "MASTER_PORT": "29511",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    assert "CUDA_VISIBLE_DEVICES" not in rank_env(plan_ranks([("n", [])], "cpu")[0], 1, "h", 1)


def test_pool_key_separates_shapes_but_not_per_job_settings() -> None:
    base = ResourcesConfig(workers=2)
    assert pool_key(base) == pool_key(base.model_copy(update={"max_restarts": 0}))
    assert pool_key(base) == pool_key(base.model_copy(update={"threads_per_worker": 3}))
    for other in (
        {"workers": 1},
        {"cpus_per_worker": 2.0},
        {"placement": "SPREAD"},
        {"gpus_per_worker": 1.0},
        {"memory_per_worker_gb": 4.0},
    ):
        assert pool_key(base) != pool_key(base.model_copy(update=other)), other


def test_failure_policy_restarts_while_allowed_and_never_after_a_cancel() -> None:
    policy = FailurePolicy(max_restarts=2)
    died = WorkerDied("rank 1 died")
    assert [policy.decide(died, n) for n in range(3)] == [
        Decision.RESTART,
        Decision.RESTART,
        Decision.RAISE,
    ]
    assert policy.decide(Cancelled("stopped"), 0) is Decision.RAISE
    assert FailurePolicy(0).decide(ValueError("x"), 0) is Decision.RAISE


def test_root_cause_names_the_first_worker_error_in_one_line() -> None:
    exc = WorkerGroupError("rank 1: ...", {1: ValueError("bad batch\nsecond line")})
    assert _root_cause(exc) == "second line"
    one = WorkerGroupError("x", {0: WorkerDied("rank 0's worker process died")})
    assert _root_cause(one) == "WorkerDied: rank 0's worker process died"


class FakeGroup:
    """Stands in for a WorkerGroup: runs ``outcomes`` in turn (an exception is raised)."""

    made: list[FakeGroup] = []

    def __init__(self, resources: Any, outcomes: list[Any] | None = None) -> None:
        self.key = pool_key(resources)
        self.outcomes = list(outcomes or [{"steps": 1}])
        self.dead = False
        self.nodes: list[str] = []  # each rank's Ray node id, once placed
        FakeGroup.made.append(self)

    @property
    def healthy(self) -> bool:
        return not self.dead

    def run(self, config: dict[str, Any]) -> dict[str, Any]:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            self.dead = True
            raise WorkerGroupError(str(outcome), {0: outcome})
        return dict(outcome)

    def shutdown(self) -> None:
        self.dead = True


def test_job_restarts_on_a_fresh_group_until_max_restarts() -> None:
    res = ResourcesConfig(workers=2, max_restarts=1)
    first = FakeGroup(res, [WorkerDied("rank 1 died")])
    fresh: list[FakeGroup] = []

    def new_group(exclude: frozenset[str]) -> FakeGroup:
        fresh.append(FakeGroup(res, [{"steps": 10}]))
        return fresh[-1]

    job = WorkerJob(res, first, new_group=new_group)  # type: ignore[arg-type]
    assert job.run({}) == {"steps": 10}
    assert job.restarts == 1 and len(fresh) == 1 and first.dead and job.group is fresh[0]

    again = WorkerJob(
        res,
        FakeGroup(res, [WorkerDied("a")]),  # type: ignore[arg-type]
        new_group=lambda ex: FakeGroup(res, [WorkerDied("b")]),  # type: ignore[arg-type,return-value]
    )
    with pytest.raises(WorkerGroupError, match="b"):
        again.run({})
    assert again.restarts == 1


def test_a_stopped_job_is_not_restarted() -> None:
    res = ResourcesConfig(workers=1, max_restarts=5)
    made: list[FakeGroup] = []
    job = WorkerJob(
        res,
        FakeGroup(res, [WorkerDied("killed by stop")]),  # type: ignore[arg-type]
        new_group=lambda ex: made.append(FakeGroup(res)) or made[-1],  # type: ignore[arg-type,func-returns-value]
    )
    job.stop()
    with pytest.raises(WorkerGroupError):
        job.run({})
    assert made == [] and job.restarts == 0


def test_pool_keeps_clean_groups_per_key_and_frees_other_shapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(WorkerPool, "_new", lambda self, res: FakeGroup(res))
    one, two = ResourcesConfig(workers=1), ResourcesConfig(workers=2)
    pool = WorkerPool()
    a = pool.acquire(one)
    pool.release(a)
    assert pool.acquire(one) is a  # warm
    b = pool.acquire(one)  # a is in use: a second group for a second slot
    assert b is not a
    pool.release(a)
    pool.release(b)
    assert len(pool.idle()) == 2
    broken = pool.acquire(one)
    assert broken is b
    b.shutdown()
    pool.release(b)  # a failed group is never kept
    assert pool.idle() == [a]
    c = pool.acquire(two)  # another shape: the idle one-worker group is freed first
    assert pool.idle() == [] and not a.healthy
    pool.release(c)
    assert pool.idle() == [c]
    pool.shutdown()
    assert not c.healthy and pool.idle() == []
    late = FakeGroup(two)
    pool.release(late)  # type: ignore[arg-type]
    assert not late.healthy


def test_death_reason_is_the_error_that_killed_the_actor_else_the_first_line() -> None:
    created = (
        "The actor died because of an error raised in its creation task, ActorID(ab)\n"
        'Traceback (most recent call last):\n  File "x.py", line 3\n'
        "orchestrator.errors.UsageError: Ray gave this worker no GPU\n"
    )
    assert death_reason(created) == "orchestrator.errors.UsageError: Ray gave this worker no GPU"
    exited = "The actor died unexpectedly before finishing this task.\n\tclass_name: RankWorker"
    assert death_reason(exited) == "The actor died unexpectedly before finishing this task."
    assert death_reason("") == ""


def test_a_node_excluded_by_one_job_is_kept_out_of_the_pools_later_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sweep: one variant's job moved off a bad node; the pool's idle group with a rank
    there is shut down, a group on it that finishes later is not kept, and every new group
    is placed without it."""
    made: list[tuple[FakeGroup, frozenset[str]]] = []

    def new(self: WorkerPool, res: Any) -> FakeGroup:
        made.append((FakeGroup(res), self.excluded))
        return made[-1][0]

    monkeypatch.setattr(WorkerPool, "_new", new)
    res = ResourcesConfig(workers=2)
    pool = WorkerPool()
    on_bad, elsewhere, busy = pool.acquire(res), pool.acquire(res), pool.acquire(res)
    on_bad.nodes, elsewhere.nodes, busy.nodes = ["good", "bad"], ["good", "good"], ["bad", "x"]
    pool.release(on_bad)
    pool.release(elsewhere)
    pool.exclude("bad")
    assert not on_bad.healthy and pool.idle() == [elsewhere] and pool.excluded == {"bad"}
    pool.release(busy)  # finished cleanly, but it has a rank on the bad node
    assert not busy.healthy and pool.idle() == [elsewhere]
    assert pool.acquire(res) is elsewhere
    fresh = pool.acquire(res)
    assert made[-1] == (fresh, frozenset({"bad"}))  # placed off the bad node
    assert [ex for _, ex in made[:3]] == [frozenset()] * 3
