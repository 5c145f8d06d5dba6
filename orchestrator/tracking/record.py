"""The parts of a run's record that only the worker or the driver process knows.

:func:`orchestrator.tracking.runs.open_run` records the recipe (artifact, params,
sha256), versions and git state. This module adds what is known later or elsewhere:

* worker rank 0, once the engine is built (:func:`log_worker_record`): the data
  identity as an MLflow dataset input (``mlflow.log_input``-style, with the content
  fingerprint), the DeepSpeed config actually used (artifact ``ds_config.json``),
  the hardware (world size, device) and the versions of user factory packages;
* the driver, when a job ends (:func:`log_checkpoints`): every committed checkpoint
  with its manifest (artifact ``checkpoints.json``);
* the driver, while a job runs (:func:`driver_tags`, :class:`DriverHeartbeat`): who
  drives the run (host, pid, process start time) and a heartbeat tag, so that
  ``regimen audit --reconcile`` can tell a live run from one whose driver died.

Every function here is best effort: a tracking failure is logged, never raised, so
that it cannot stop a training run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.tracking.client import mlflow_client

logger = logging.getLogger(__name__)

DS_CONFIG_ARTIFACT = "ds_config.json"
CHECKPOINTS_ARTIFACT = "checkpoints.json"
DRIVER_HOST = "regimen.driver.host"
DRIVER_PID = "regimen.driver.pid"
DRIVER_STARTED = "regimen.driver.started"  # the driver process's start time (epoch s)
HEARTBEAT = "regimen.driver.heartbeat"  # epoch s, refreshed every HEARTBEAT_EVERY_S
HEARTBEAT_EVERY_S = 30.0
_DIGEST_LEN = 32  # MLflow's dataset digest column holds 36 characters


def process_started(pid: int) -> float | None:
    """Start time (epoch s, 2 decimals) of process ``pid``, or None when it does not exist."""
    try:
        import psutil

        return round(float(psutil.Process(pid).create_time()), 2)
    except Exception:
        return None


def driver_tags() -> dict[str, str]:
    """Tags naming the calling process as a run's driver, with a first heartbeat."""
    pid = os.getpid()
    return {
        DRIVER_HOST: socket.gethostname(),
        DRIVER_PID: str(pid),
        DRIVER_STARTED: str(process_started(pid) or ""),
        HEARTBEAT: str(round(time.time(), 1)),
    }


class DriverHeartbeat:
    """A daemon thread that sets the heartbeat tag on ``run_ids`` every ``every_s`` seconds.

    Runs off the driver's own thread so that an unreachable tracking server (whose
    client retries for minutes) never stalls the job; failures are ignored.
    """

    def __init__(self, tracking_uri: str, run_ids: list[str], every_s: float = HEARTBEAT_EVERY_S):
        self.tracking_uri, self.run_ids, self.every_s = tracking_uri, list(run_ids), every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="regimen-heartbeat", daemon=True)

    def __enter__(self) -> DriverHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for run_id in self.run_ids:
                with contextlib.suppress(Exception):
                    mlflow_client(self.tracking_uri).set_tag(
                        run_id, HEARTBEAT, str(round(time.time(), 1))
                    )


def _dist_of_module(module: str) -> tuple[str, str] | None:
    top = module.split(".")[0]
    with contextlib.suppress(Exception):
        for dist in importlib.metadata.packages_distributions().get(top, []):
            return dist, importlib.metadata.version(dist)
    return None


def factory_versions(recipe: Mapping[str, Any]) -> dict[str, str]:
    """Tags for the user code a recipe calls (``model.factory``, ``data.factory``, ...).

    An installed distribution gives ``regimen.versions.factory.<dist>`` = its version;
    a plain module gives ``regimen.factory.<section>.sha256`` of its source file.
    """
    tags: dict[str, str] = {}
    for section in ("model", "data"):
        ref = (recipe.get(section) or {}).get("factory")
        if not ref or ":" not in str(ref):
            continue
        module = str(ref).split(":")[0]
        tags[f"regimen.factory.{section}"] = str(ref)
        found = _dist_of_module(module)
        if found:
            tags[f"regimen.versions.factory.{found[0]}"] = found[1]
            continue
        with contextlib.suppress(Exception):
            import importlib.util

            spec = importlib.util.find_spec(module)
            if spec is not None and spec.origin and Path(spec.origin).is_file():
                digest = hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()
                tags[f"regimen.factory.{section}.sha256"] = digest
    return tags


def hardware_tags(world_size: int, device: Any) -> dict[str, str]:
    """World size and the devices it ran on (device type; CUDA name and count when used)."""
    tags = {"regimen.world_size": str(world_size), "regimen.device": str(device)}
    tags["regimen.machine"] = f"{platform.machine()} ({os.cpu_count()} cpus)"
    with contextlib.suppress(Exception):
        import torch

        if str(device).startswith("cuda") and torch.cuda.is_available():
            tags["regimen.device_name"] = torch.cuda.get_device_name(torch.device(str(device)))
            tags["regimen.devices_per_node"] = str(torch.cuda.device_count())
    return tags


def data_input(fingerprint: str, description: str, data_cfg: Mapping[str, Any]) -> Any:
    """An MLflow ``DatasetInput`` for the training data: digest = the content fingerprint.

    The digest column is short, so it holds the first 32 hex digits; the whole
    fingerprint and the data section of the recipe are in the dataset's profile.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = {k: v for k, v in data_cfg.items() if k in ("kind", "paths", "factory", "max_bytes")}
    profile = {"fingerprint": fingerprint, "description": description}
    dataset = Dataset(
        name=f"{data_cfg.get('kind', 'data')}-train",
        digest=fingerprint.split(":")[-1][:_DIGEST_LEN],
        source_type="regimen",
        source=json.dumps(source, default=str),
        profile=json.dumps(profile, default=str),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])


def log_worker_record(
    tracking_uri: str,
    run_id: str,
    *,
    recipe: Mapping[str, Any],
    fingerprint: str,
    description: str,
    ds_config: Mapping[str, Any] | None,
    world_size: int,
    device: Any,
) -> bool:
    """Rank 0, after ``deepspeed.initialize``: data input, ``ds_config.json``, hardware and
    factory tags. True when all of it was logged; on failure, a warning and False."""
    from orchestrator.tracking.redact import redact
    from orchestrator.tracking.runs import set_tags

    try:
        client = mlflow_client(tracking_uri)
        data_cfg = dict(recipe.get("data") or {})
        client.log_inputs(run_id, datasets=[data_input(fingerprint, description, data_cfg)])
        if ds_config is not None:
            text = json.dumps(redact(dict(ds_config)), indent=2, sort_keys=True, default=str)
            client.log_text(run_id, text, DS_CONFIG_ARTIFACT)
        tags = {**hardware_tags(world_size, device), **factory_versions(recipe)}
        tags["regimen.data_fingerprint"] = fingerprint
        set_tags(tracking_uri, run_id, tags)
        return True
    except Exception as exc:
        logger.warning("could not record data/hardware/ds_config of run %s: %s", run_id, exc)
        return False


def checkpoint_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every checkpoint under ``run_dir`` (committed, then abandoned by rollbacks) with its
    manifest: ``{step, path, state, manifest}``."""
    out: list[dict[str, Any]] = []
    from orchestrator.rundir import RunDir

    rd = RunDir(run_dir)
    roots = [("committed", rd.checkpoints)] + [("abandoned", p) for p in rd.abandoned_sets()]
    for state, root in roots:
        for manifest_path in sorted(root.glob("step-*/manifest.json")):
            try:
                manifest = json.loads(manifest_path.read_text())
            except (OSError, ValueError):
                continue
            step = manifest.get("step")
            out.append(
                {
                    "step": step,
                    "path": str(manifest_path.parent),
                    "state": state,
                    "manifest": manifest,
                }
            )
    return sorted(out, key=lambda r: (r["state"] != "committed", r["step"] or 0))


def log_checkpoints(tracking_uri: str, run_id: str, run_dir: Path | str) -> bool:
    """Driver, when a job ends: the artifact ``checkpoints.json`` (paths + manifests)."""
    try:
        records = checkpoint_records(Path(run_dir))
        text = json.dumps(records, indent=1, default=str)
        mlflow_client(tracking_uri).log_text(run_id, text, CHECKPOINTS_ARTIFACT)
        return True
    except Exception as exc:
        logger.warning("could not record the checkpoints of run %s: %s", run_id, exc)
        return False
