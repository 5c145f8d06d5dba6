"""The accelerator is decided on each worker from what Ray gave it, never on the driver.

A KubeRay head or a laptop submitting to a GPU cluster has no GPU; its workers do. These run
on a CPU-only machine, so every test here is what such a driver sees."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from conftest import REPO
from orchestrator.cluster import jobs, launch, manifests
from orchestrator.engine import loop
from orchestrator.errors import UsageError
from orchestrator.recipe.loader import load_recipe
from orchestrator.recipe.sections import ResourcesConfig

TINY = Path(__file__).parents[2] / "integration" / "data" / "tiny.yaml"


@pytest.fixture
def cpu_only_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver without CUDA, whose own process runs DeepSpeed's CPU accelerator."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def test_gpu_workers_get_cuda_whatever_the_driver_has(cpu_only_driver: None) -> None:
    gpu = ResourcesConfig(workers=2, gpus_per_worker=1)
    assert gpu.device == "cuda"
    assert launch.worker_accelerator(gpu, [0]) == "cuda"
    assert launch.worker_accelerator(ResourcesConfig(gpus_per_worker=0.5), ["3"]) == "cuda"


def test_cpu_recipe_trains_on_cpu_even_on_a_gpu_node() -> None:
    cpu = ResourcesConfig(workers=2)
    assert cpu.device == "cpu"
    assert launch.worker_accelerator(cpu, [0, 1]) == "cpu"


def test_gpu_recipe_without_a_gpu_from_ray_is_a_clear_error() -> None:
    with pytest.raises(UsageError, match="Ray gave this worker no GPU"):
        launch.worker_accelerator(ResourcesConfig(gpus_per_worker=1), [])


def test_ensure_ray_forwards_no_accelerator_from_the_driver(
    cpu_only_driver: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(launch.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(launch.ray, "init", lambda **kw: seen.update(kw))
    launch.ensure_ray(address="ray://head:10001")
    env = seen["runtime_env"]["env_vars"]
    assert "DS_ACCELERATOR" not in env and env["RAY_TRAIN_V2_ENABLED"] == "1"


def test_embedded_ray_passes_the_workers_variables_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No job-level runtime_env on the embedded Ray (it costs ray.init its agent and keeps
    the prestarted workers idle): its processes inherit the variables from the driver's
    environment while ray.init starts them, and the driver's own environment is left as it
    was; a value the user set wins."""
    seen: dict[str, Any] = {}

    def init(**kwargs: Any) -> None:
        seen.update(kwargs, environ=dict(os.environ))

    monkeypatch.setattr(launch.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(launch.ray, "init", init)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    launch.ensure_ray()
    assert "runtime_env" not in seen
    assert seen["environ"]["TOKENIZERS_PARALLELISM"] == "false"
    assert seen["environ"]["RAY_TRAIN_V2_ENABLED"] == "1"
    assert seen["environ"]["OMP_NUM_THREADS"] == "3"  # the user's
    assert "TOKENIZERS_PARALLELISM" not in os.environ and os.environ["OMP_NUM_THREADS"] == "3"


def _run_worker_entry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, overrides: list[str], gpu_ids: list[Any]
) -> str:
    """Run ``_worker_entry`` as a Ray worker would, up to the training call; returns the
    DS_ACCELERATOR the training loop (and DeepSpeed's import) would see."""
    seen: dict[str, str] = {}

    def train(recipe: Any, ctx: Any) -> dict[str, Any]:
        import os

        seen["accelerator"] = os.environ["DS_ACCELERATOR"]
        return {}

    context = SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 2)
    monkeypatch.setattr("ray.train.get_context", lambda: context)
    monkeypatch.setattr(launch.ray, "get_gpu_ids", lambda: gpu_ids)
    monkeypatch.setattr(loop, "train", train)
    # this test process imported DeepSpeed already; a fresh Ray worker has not
    monkeypatch.setitem(
        sys.modules, "deepspeed.accelerator.real_accelerator", SimpleNamespace(ds_accelerator=None)
    )
    recipe_yaml = load_recipe(TINY, overrides).yaml_text
    launch._worker_entry({"recipe_yaml": recipe_yaml, "run_dir": str(tmp_path / "run")})
    return seen["accelerator"]


def test_worker_of_a_gpu_recipe_launched_from_a_cpu_driver_chooses_cuda(
    cpu_only_driver: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The bug: the driver's DS_ACCELERATOR=cpu reached GPU workers (DeepSpeed on the CPU)."""
    gpu = ["resources.gpus_per_worker=1"]
    assert _run_worker_entry(monkeypatch, tmp_path, gpu, gpu_ids=[0]) == "cuda"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # a GPU node's environment, a CPU recipe
    assert _run_worker_entry(monkeypatch, tmp_path, [], gpu_ids=[]) == "cpu"


def test_accelerator_already_imported_differently_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chosen = SimpleNamespace(device_name=lambda: "cpu")
    monkeypatch.setitem(
        sys.modules,
        "deepspeed.accelerator.real_accelerator",
        SimpleNamespace(ds_accelerator=chosen),
    )
    with pytest.raises(UsageError, match="imported with the cpu accelerator"):
        launch._select_accelerator("cuda")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    launch._select_accelerator("cpu")  # the same choice: fine


def _envs(doc: dict[str, Any]) -> list[str]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [
        e["name"] for g in groups for c in g["template"]["spec"]["containers"] for e in c["env"]
    ]


@pytest.mark.parametrize("kind", ["rayjob", "raycluster"])
def test_kuberay_manifests_bake_no_accelerator(cpu_only_driver: None, kind: str) -> None:
    text = manifests.from_recipe_file(
        str(REPO / "recipes" / "quickstart.yaml"), ["resources.gpus_per_worker=1"], kind=kind
    )
    docs = list(yaml.safe_load_all(text))
    names = _envs(docs[-1])
    assert names and "DS_ACCELERATOR" not in names
    for path in (REPO / "deploy" / "kuberay").glob("*.yaml"):
        assert "DS_ACCELERATOR" not in path.read_text(), path


def test_submit_ships_no_accelerator_from_the_submitting_machine(
    cpu_only_driver: None,
) -> None:
    shipment, _, _ = jobs.prepare(TINY, ["resources.gpus_per_worker=1"])
    try:
        assert "DS_ACCELERATOR" not in shipment.runtime_env["env_vars"]
    finally:
        import shutil

        shutil.rmtree(shipment.workdir)
    with pytest.raises(UsageError, match="each worker chooses its accelerator"):
        jobs.prepare(TINY, [], env={"DS_ACCELERATOR": "cpu"})


def test_stop_ray_kills_the_embedded_monitor_before_the_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The autoscaler monitor would hold ``ray.shutdown`` for a second (it reports its
    SIGTERM to the GCS already gone); it is dead before the shutdown starts, the other
    processes are left to Ray's own shutdown."""
    import subprocess

    monitor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    raylet = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    node = SimpleNamespace(
        all_processes={
            "monitor": [SimpleNamespace(process=monitor)],
            "raylet": [SimpleNamespace(process=raylet)],
        }
    )
    seen: dict[str, Any] = {}
    monkeypatch.setattr(launch.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(launch.ray._private.worker, "_global_node", node, raising=False)
    monkeypatch.setattr(
        launch.ray, "shutdown", lambda: seen.update(monitor=monitor.poll(), raylet=raylet.poll())
    )
    try:
        launch.stop_ray()
    finally:
        raylet.kill()
        raylet.wait()
    assert seen == {"monitor": -9, "raylet": None}


def test_stop_ray_without_ray_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(launch.ray, "shutdown", lambda: pytest.fail("shut down twice"))
    launch.stop_ray()


def test_stop_ray_on_the_way_out_kills_every_ray_process_and_its_children(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exiting: the embedded cluster's processes and theirs (the raylet's workers and
    agents) are killed at once, and Ray's own exit handler, which would wait on them, is
    dropped; nothing is shut down the slow way."""
    import atexit
    import subprocess

    import psutil

    spawn_child = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "time.sleep(60)"
    )
    raylet = subprocess.Popen([sys.executable, "-c", spawn_child])
    gcs = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    parent = psutil.Process(raylet.pid)
    deadline = time.monotonic() + 20
    while not parent.children() and time.monotonic() < deadline:
        time.sleep(0.05)
    (worker,) = parent.children()
    node = SimpleNamespace(
        all_processes={
            "raylet": [SimpleNamespace(process=raylet)],
            "gcs_server": [SimpleNamespace(process=gcs)],
        }
    )
    dropped: list[Any] = []
    monkeypatch.setattr(launch.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(launch.ray._private.worker, "_global_node", node, raising=False)
    monkeypatch.setattr(launch.ray, "shutdown", lambda: pytest.fail("shut down the slow way"))
    monkeypatch.setattr(atexit, "unregister", dropped.append)
    launch.stop_ray(exiting=True)
    assert raylet.wait(timeout=10) == -9 and gcs.wait(timeout=10) == -9
    worker.wait(timeout=10)  # the raylet's child, killed too (psutil reaps or sees it gone)
    assert not worker.is_running()
    assert dropped == [launch.ray.shutdown]
