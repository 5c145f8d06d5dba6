"""The worker group on real local Ray (2 ranks, gloo, DeepSpeed ZeRO-1, MLflow sqlite): the
same weights as the Ray Train launcher, warm groups reused across sweep variants with each
variant's result equal to running it alone, and a cancelled job ended KILLED."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
import ray
import torch

from conftest import tiny_recipe
from orchestrator.cluster.workers import WorkerPool
from orchestrator.control.controller import JobResult, run_job, run_variants
from orchestrator.recipe.expand import Variant
from orchestrator.recipe.jobspec import JobSpec

pytestmark = pytest.mark.integration

JOB = {
    "schedule": {"steps": 6, "micro_batch_size": 2},
    "checkpoint": {"every": 3, "keep": 0},
    "resources": {"workers": 2, "max_restarts": 0},
    "deepspeed": {"zero_optimization": {"stage": 1}},
}


def _recipe(tmp_path: Path, seed: int = 0, launcher: str = "workers") -> Any:
    return tiny_recipe(
        tmp_path, seed=seed, resources={**JOB["resources"], "launcher": launcher}, **_rest()
    )


def _rest() -> dict[str, Any]:
    return {k: v for k, v in JOB.items() if k != "resources"}


def _weights(result: JobResult) -> dict[str, torch.Tensor]:
    assert result.status == "FINISHED", result.error
    path = Path(str(result.checkpoint)) / "ds" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False, map_location="cpu")["module"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class SamplingPool(WorkerPool):
    """Records the actor pids of every group handed back after a clean job."""

    def __init__(self) -> None:
        super().__init__()
        self.pids: list[list[int]] = []

    def release(self, group: Any) -> None:
        self.pids.append(list(group.pids))
        super().release(group)


def test_worker_group_matches_ray_train_and_reuses_warm_groups_across_variants(
    tmp_path: Path, ray_local: None
) -> None:
    reference = _weights(
        run_job(JobSpec.of("ref", _recipe(tmp_path / "ref", launcher="ray_train")))
    )
    alone = _weights(run_job(JobSpec.of("alone", _recipe(tmp_path / "alone", seed=1))))
    sweep_dir = tmp_path / "sweep"
    variants = [
        Variant(name=f"seed{s}", assignments={"seed": s}, recipe=_recipe(sweep_dir, seed=s))
        for s in (0, 1, 0)
    ]
    pool = SamplingPool()
    try:
        results = run_variants(variants, recipe_name="sweep", max_concurrent=1, pool=pool)
    finally:
        pool.shutdown()
    assert [r.status for r in results] == ["FINISHED"] * 3, [r.error for r in results]
    # one warm group ran all three variants: the same two processes each time
    assert len(pool.pids) == 3 and pool.pids[0] == pool.pids[1] == pool.pids[2]
    assert len(set(pool.pids[0])) == 2
    first, second, third = (_weights(r) for r in results)
    assert _same(first, reference), "worker group and Ray Train trained different weights"
    assert _same(second, alone), "a variant on a warm group differs from the same job alone"
    assert _same(third, first), "state of an earlier variant leaked into a later one"
    client = mlflow.MlflowClient(variants[0].recipe.tracking.uri)
    assert all(client.get_run(r.run_id).info.status == "FINISHED" for r in results)


def test_cancel_kills_the_group_and_ends_the_run_killed(tmp_path: Path, ray_local: None) -> None:
    recipe = tiny_recipe(
        tmp_path,
        schedule={"steps": 400, "micro_batch_size": 2},
        checkpoint={"every": 1000, "keep": 0},
        resources={"workers": 2, "max_restarts": 3},
    )
    cancel = threading.Event()
    seen: list[dict[str, Any]] = []

    def progress(name: str, p: dict[str, Any]) -> None:
        if p.get("step", 0) >= 2:
            seen.append(p)
            cancel.set()

    made: list[Any] = []

    class Recording(WorkerPool):
        def _new(self, resources: Any) -> Any:
            made.append(super()._new(resources))
            return made[-1]

    pool = Recording()
    started = time.monotonic()
    spec = JobSpec.of("cancelled", recipe)
    result = run_job(spec, on_progress=progress, cancel=cancel, pool=pool)
    assert result.status == "KILLED" and seen
    assert time.monotonic() - started < 120
    run = mlflow.MlflowClient(recipe.tracking.uri).get_run(result.run_id)
    assert run.info.status == "KILLED"
    assert len(made) == 1 and not made[0].healthy and pool.idle() == []
    for actor in made[0].actors:  # killed at once, not left training
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.describe.remote(), timeout=30)
