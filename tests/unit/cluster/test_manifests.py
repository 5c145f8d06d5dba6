"""KubeRay manifests agree with the recipe (image, command, resources); deploy/ is current."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import REPO
from orchestrator.cluster import manifests
from orchestrator.recipe.loader import load_recipe

DEPLOY = REPO / "deploy"
SERVER = ["tracking.uri=http://mlflow.regimen.svc:5000", "checkpoint.storage=/shared/runs"]


def _docs(recipe: Path, *overrides: str, **kw):
    text = manifests.from_recipe_file(str(recipe), list(overrides), **kw)
    return list(yaml.safe_load_all(text))


def _workers(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    (group,) = spec["workerGroupSpecs"]
    return spec, group, group["template"]["spec"]["containers"][0]


def test_rayjob_matches_the_recipe(tmp_path):
    recipe = REPO / "recipes" / "quickstart.yaml"
    cm, job = _docs(recipe, "resources.workers=3", "resources.cpus_per_worker=2", image="img:1")
    loaded = load_recipe(recipe, ["resources.workers=3", "resources.cpus_per_worker=2"])
    assert cm["kind"] == "ConfigMap" and job["kind"] == "RayJob"
    assert yaml.safe_load(cm["data"]["recipe.yaml"]) == yaml.safe_load(loaded.yaml_text)
    assert job["spec"]["entrypoint"].startswith("regimen run /regimen/recipe.yaml --address auto")
    spec, group, worker = _workers(job)
    assert spec["rayVersion"] == manifests.RAY_VERSION
    assert group["replicas"] == 3 and group["rayStartParams"]["num-cpus"] == "2"
    assert worker["image"] == "img:1" and worker["resources"]["limits"]["cpu"] == "2"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"] == "img:1"
    mounts = {v["name"]: v for v in worker["volumeMounts"]}
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    assert volumes["recipe"]["configMap"]["name"] == cm["metadata"]["name"]
    assert mounts["recipe"]["mountPath"] == "/regimen"


def test_gpu_accelerator_and_strict_pack(tmp_path):
    recipe = REPO / "recipes" / "quickstart.yaml"
    over = ["resources.workers=4", "resources.gpus_per_worker=1", "resources.cpus_per_worker=4",
            "resources.accelerator_type=A100", "resources.memory_per_worker_gb=32",
            "resources.placement=STRICT_PACK"]  # fmt: skip
    _, job = _docs(recipe, *over)
    _, group, worker = _workers(job)
    assert group["replicas"] == 1  # one node for one-node DeepSpeed
    limits = worker["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 4 and limits["cpu"] == "16"
    assert limits["memory"] == "131072Mi"
    assert group["rayStartParams"]["num-gpus"] == "4"
    assert json.loads(group["rayStartParams"]["resources"]) == {"accelerator_type:A100": 4}
    assert group["template"]["spec"]["nodeSelector"] == {manifests.GPU_NODE_LABEL: "A100"}


def test_raycluster_kind(tmp_path):
    _, cluster = _docs(REPO / "recipes" / "quickstart.yaml", kind="raycluster")
    assert cluster["kind"] == "RayCluster" and "workerGroupSpecs" in cluster["spec"]


def test_checked_in_kuberay_manifests_are_current():
    recipe = REPO / "recipes" / "quickstart.yaml"
    for kind in ("rayjob", "raycluster"):
        on_disk = list(yaml.safe_load_all((DEPLOY / "kuberay" / f"{kind}.yaml").read_text()))
        assert on_disk == _docs(recipe, *SERVER, kind=kind), (
            f"deploy/kuberay/{kind}.yaml is stale: regenerate with `regimen deploy kuberay "
            f"recipes/quickstart.yaml {' '.join(SERVER)} --kind {kind} "
            f"-o deploy/kuberay/{kind}.yaml`"
        )


def test_launcher_dockerfile_and_mlflow_stack_agree():
    launcher = yaml.safe_load((DEPLOY / "ray-cluster-launcher.yaml").read_text())
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"ray[default,train]=={manifests.RAY_VERSION}" in dockerfile
    for pin in ("torch==", "deepspeed==", "mlflow==", "transformers=="):
        assert pin in dockerfile, pin
    assert "ray start --head" in " ".join(launcher["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in " ".join(launcher["head_start_ray_commands"])
    assert launcher["docker"]["image"] == manifests.DEFAULT_IMAGE
    compose = yaml.safe_load((DEPLOY / "mlflow" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= services.keys()
    command = " ".join(services["mlflow"]["command"])
    assert "postgresql" in command and "s3://" in command and "--app-name basic-auth" in command
