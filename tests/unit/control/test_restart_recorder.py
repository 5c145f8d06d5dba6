"""What the driver does when a job restarts without a bad worker's node: the event and tag
in MLflow, and the node kept out of the sweep's later groups (the pool's)."""

from __future__ import annotations

from orchestrator.cluster.workers import WorkerPool
from orchestrator.control.controller import _restart_recorder
from orchestrator.tracking.client import mlflow_client
from orchestrator.tracking.runs import open_run


def test_a_restart_without_a_node_is_recorded_and_excluded_for_the_sweep(mlflow_uri):
    run_id = open_run(mlflow_uri, "regimen", "job")
    pool = WorkerPool()
    facts = {"rank": 1, "node_id": "n" * 56, "host": "gpu-7", "step": 10, "restart": 1,
             "max_restarts": 2, "excluded_nodes": ["n" * 56]}  # fmt: skip
    _restart_recorder(mlflow_uri, run_id, pool)(facts)
    assert pool.excluded == {"n" * 56}
    run = mlflow_client(mlflow_uri).get_run(run_id)
    assert run.data.tags["regimen.excluded_nodes"] == "n" * 56


def test_a_restart_in_a_sweep_avoids_the_nodes_found_bad_since_the_job_began(monkeypatch):
    """The pool's excluded nodes are read when the fresh group is made, not when the job
    started: a node another variant found bad meanwhile is avoided too."""
    from orchestrator.cluster import workers
    from orchestrator.control.controller import _group_maker
    from orchestrator.recipe.sections import ResourcesConfig

    made: list[frozenset[str]] = []
    monkeypatch.setattr(workers, "WorkerGroup", lambda res, ex: made.append(ex) or ex)
    pool = WorkerPool()
    make = _group_maker(ResourcesConfig(workers=2), pool)
    pool.exclude("bad-b")  # another variant, after this job started
    make(frozenset({"bad-a"}))
    assert made == [frozenset({"bad-a", "bad-b"})]
