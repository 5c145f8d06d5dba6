"""Resources that can never fit a cluster are refused before anything starts."""

from __future__ import annotations

import pytest

from orchestrator.cluster.fit import ResourceFitError, check_variants, fit_problems
from orchestrator.recipe.schema import ResourcesConfig

GiB = 2**30
TWO_NODES = [{"CPU": 2.0, "memory": 8 * GiB}, {"CPU": 2.0, "memory": 8 * GiB}]


def res(**kw):
    return ResourcesConfig(**kw)


def test_fits_across_nodes_with_pack_and_spread():
    assert fit_problems(res(workers=4, cpus_per_worker=1), TWO_NODES) == []
    assert fit_problems(res(workers=2, placement="SPREAD"), TWO_NODES) == []
    assert fit_problems(res(workers=2, placement="STRICT_SPREAD"), TWO_NODES) == []


def test_too_many_workers_in_total():
    (msg,) = fit_problems(res(workers=5, cpus_per_worker=1), TWO_NODES)
    assert "never fit" in msg and "resources.workers" in msg and "4" in msg


def test_worker_bigger_than_any_node():
    (msg,) = fit_problems(res(workers=1, cpus_per_worker=3), TWO_NODES)
    assert "no single node has that much" in msg and "cpus_per_worker" in msg


def test_strict_pack_needs_one_node():
    (msg,) = fit_problems(res(workers=3, placement="STRICT_PACK"), TWO_NODES)
    assert "STRICT_PACK" in msg and "workers <= 2" in msg
    assert fit_problems(res(workers=2, placement="STRICT_PACK"), TWO_NODES) == []


def test_strict_spread_needs_distinct_nodes():
    (msg,) = fit_problems(res(workers=3, placement="STRICT_SPREAD"), TWO_NODES)
    assert "STRICT_SPREAD" in msg and "3 distinct nodes" in msg


def test_gpus_and_accelerator_type_and_memory():
    (msg,) = fit_problems(res(workers=1, gpus_per_worker=1), TWO_NODES)
    assert "GPU" in msg and "gpus_per_worker: 0" in msg
    gpu_nodes = [{"CPU": 8.0, "GPU": 4.0, "accelerator_type:A100": 1.0}]
    assert fit_problems(res(workers=4, gpus_per_worker=1, accelerator_type="A100"), gpu_nodes) == []
    (msg,) = fit_problems(res(workers=1, gpus_per_worker=1, accelerator_type="H100"), gpu_nodes)
    assert "accelerator_type:H100" in msg
    (msg,) = fit_problems(res(workers=1, memory_per_worker_gb=16), TWO_NODES)
    assert "memory=16GiB" in msg


def test_fractional_requests_pack():
    assert fit_problems(res(workers=8, cpus_per_worker=0.5), TWO_NODES) == []
    assert fit_problems(res(workers=9, cpus_per_worker=0.5), TWO_NODES)


def test_check_variants_names_each_bad_variant(tmp_path):
    from types import SimpleNamespace

    from conftest import tiny_recipe

    ok = SimpleNamespace(name="ok", recipe=tiny_recipe(tmp_path))
    big = SimpleNamespace(name="big", recipe=tiny_recipe(tmp_path, resources={"workers": 9}))
    check_variants([ok], nodes=TWO_NODES)
    with pytest.raises(ResourceFitError) as info:
        check_variants([ok, big], nodes=TWO_NODES)
    assert info.value.exit_code == 2 and str(info.value).startswith("big: resources")


def test_jobs_at_once_counts_worker_slots():
    from orchestrator.cluster.fit import jobs_at_once

    assert jobs_at_once(res(workers=1, cpus_per_worker=1), TWO_NODES) == 4
    assert jobs_at_once(res(workers=2, cpus_per_worker=1), TWO_NODES) == 2
    assert jobs_at_once(res(workers=3, cpus_per_worker=1), TWO_NODES) == 1  # 4 slots, 3 a job
    assert jobs_at_once(res(workers=2, placement="STRICT_PACK"), TWO_NODES) == 2
    # 3 per node never packs two jobs onto a node, and never one across two
    three = [{"CPU": 3.0}, {"CPU": 3.0}]
    assert jobs_at_once(res(workers=2, placement="STRICT_PACK"), three) == 2
    assert jobs_at_once(res(workers=4, cpus_per_worker=1), TWO_NODES) == 1
    assert jobs_at_once(res(workers=1, cpus_per_worker=8), TWO_NODES) == 1  # never 0
