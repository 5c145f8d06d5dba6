"""KubeRay manifests generated from a recipe, so images, commands and resources agree with it.

``regimen deploy kuberay RECIPE [--kind rayjob|raycluster] [--image ...]`` prints
(or writes) multi-document YAML:

- a ``ConfigMap`` holding the resolved ``recipe.yaml`` (mounted at ``/regimen``);
- a ``RayJob`` (runs ``regimen run /regimen/recipe.yaml --address auto`` on a
  cluster KubeRay creates and deletes), or a long-lived ``RayCluster`` to which
  ``regimen submit`` sends recipes.

One Ray worker pod per training worker, sized from ``resources``:
``cpus_per_worker`` -> ``cpu``, ``gpus_per_worker`` -> ``nvidia.com/gpu``,
``memory_per_worker_gb`` -> ``memory``; ``accelerator_type`` becomes a node
selector and the Ray resource ``accelerator_type:<T>``. ``STRICT_PACK`` (one-node
DeepSpeed) puts all workers in one pod of the combined size.
"""

from __future__ import annotations

import json
import math
from typing import Any

import yaml

RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = "ghcr.io/regimen/regimen:0.1.0-cu128"
RECIPE_DIR = "/regimen"
GPU_NODE_LABEL = "nvidia.com/gpu.product"
SHARED_DIR = "/shared"  # a ReadWriteMany PVC: checkpoints survive the cluster
SHARED_PVC = "regimen-shared"


def _quantity_cpu(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{math.ceil(cpus * 1000)}m"


def _mem(gb: float) -> str:
    return f"{math.ceil(gb * 1024)}Mi"


def _container(
    name: str, image: str, cpus: float, gpus: float, mem_gb: float | None
) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": _quantity_cpu(cpus), "memory": _mem(mem_gb or 4.0 * cpus)}
    if gpus:
        limits["nvidia.com/gpu"] = math.ceil(gpus)
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"limits": dict(limits), "requests": dict(limits)},
        "env": [
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {
                "name": "RAY_AUTH_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "ray-auth-token", "key": "token"}},
            },
            {"name": "MLFLOW_TRACKING_USERNAME", "valueFrom": _secret("username")},
            {"name": "MLFLOW_TRACKING_PASSWORD", "valueFrom": _secret("password")},
        ],
        "volumeMounts": [
            {"name": "recipe", "mountPath": RECIPE_DIR},
            {"name": "shared", "mountPath": SHARED_DIR},
        ],
    }


def _secret(key: str) -> dict[str, Any]:
    return {"secretKeyRef": {"name": "mlflow-auth", "key": key, "optional": True}}


def _pod(container: dict[str, Any], config_map: str, accel: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {"name": "recipe", "configMap": {"name": config_map}},
            {"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_PVC}},
        ],
    }
    if accel:
        spec["nodeSelector"] = {GPU_NODE_LABEL: accel}
    return {"spec": spec}


def _cluster_spec(recipe: Any, image: str, config_map: str) -> dict[str, Any]:
    res = recipe.resources
    workers, cpus, gpus = res.workers, res.cpus_per_worker, res.gpus_per_worker
    mem = res.memory_per_worker_gb
    per_pod = workers if res.placement == "STRICT_PACK" else 1
    replicas = 1 if res.placement == "STRICT_PACK" else workers
    start: dict[str, str] = {
        "num-cpus": str(math.ceil(cpus * per_pod)),
        "num-gpus": str(math.ceil(gpus * per_pod)),
    }
    if res.accelerator_type:
        start["resources"] = json.dumps({f"accelerator_type:{res.accelerator_type}": per_pod})
    worker = _container(
        "ray-worker", image, cpus * per_pod, gpus * per_pod, mem * per_pod if mem else None
    )
    head = _container("ray-head", image, 1, 0, 4)
    head["ports"] = [
        {"containerPort": 6379, "name": "gcs"},
        {"containerPort": 8265, "name": "dashboard"},
    ]
    return {
        "rayVersion": RAY_VERSION,
        "headGroupSpec": {
            # num-cpus 0: the driver and the MLflow client live here, never training workers
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(head, config_map, None),
        },
        "workerGroupSpecs": [
            {
                "groupName": "train",
                "replicas": replicas,
                "minReplicas": replicas,
                "maxReplicas": replicas,
                "rayStartParams": start,
                "template": _pod(worker, config_map, res.accelerator_type),
            }
        ],
    }


def kuberay(
    recipe: Any,
    recipe_yaml: str,
    *,
    kind: str = "rayjob",
    image: str = DEFAULT_IMAGE,
    namespace: str = "regimen",
) -> list[dict[str, Any]]:
    """The documents (ConfigMap + RayJob or RayCluster) that run ``recipe`` on KubeRay."""
    if kind not in ("rayjob", "raycluster"):
        raise ValueError("kind must be 'rayjob' or 'raycluster'")
    name = recipe.name.lower().replace("_", "-").replace(".", "-")[:50]
    config_map = f"{name}-recipe"
    labels = {"app.kubernetes.io/part-of": "regimen", "regimen/recipe": name}
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": config_map, "namespace": namespace, "labels": labels},
            "data": {"recipe.yaml": recipe_yaml},
        }
    ]
    spec = _cluster_spec(recipe, image, config_map)
    meta = {"name": name, "namespace": namespace, "labels": labels}
    if kind == "raycluster":
        docs.append(
            {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": meta, "spec": spec}
        )
        return docs
    docs.append(
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": meta,
            "spec": {
                "entrypoint": f"regimen run {RECIPE_DIR}/recipe.yaml --address auto --json",
                "entrypointNumCpus": 0,
                "shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": 600,
                "submissionMode": "K8sJobMode",
                "rayClusterSpec": spec,
            },
        }
    )
    return docs


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML, keys in insertion order, the recipe as a literal block."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def from_recipe_file(path: str, overrides: list[str] | None = None, **kw: Any) -> str:
    """Load, validate and render a recipe file as KubeRay YAML."""
    from orchestrator.recipe.expand import expand
    from orchestrator.recipe.loader import load_recipe

    loaded = load_recipe(path, overrides or [])
    expand(loaded)
    return to_yaml(kuberay(loaded.recipe, loaded.yaml_text, **kw))
