"""Driver side: the MLflow run lifecycle of a job (open, tag, summarize, end) and its recipe.

Every call goes through :func:`orchestrator.tracking.client.mlflow_client` (one client per
URI, never the fluent ``mlflow.start_run`` state, so several runs can be open in one
process). MLflow failures surface as ``TrackingError`` naming the URI and the fix.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import importlib.metadata
import json
import platform
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal

import yaml

from orchestrator.errors import TrackingError
from orchestrator.tracking.client import mlflow_client, mlflow_errors, read_artifact
from orchestrator.tracking.redact import redact, redact_string, redact_text
from orchestrator.tracking.sink import EVENTS_ARTIFACT, make_event, mlflow_key

RECIPE_ARTIFACT = "recipe.yaml"
DRIVER_EVENTS_ARTIFACT = "driver_events.jsonl"
TOO_LONG = "<see recipe.yaml>"
MAX_PARAM_VALUE = 6000  # MLflow's limits
MAX_TAG_VALUE = 8000
MAX_PER_BATCH = 100
TERMINAL = ("FINISHED", "FAILED", "KILLED")
_VERSIONED = ("torch", "deepspeed", "ray", "mlflow", "transformers")


def flatten_params(
    recipe: Mapping[str, Any], max_value_len: int = MAX_PARAM_VALUE, max_params: int = 500
) -> dict[str, str]:
    """The recipe as MLflow params: dotted keys, secrets redacted, every value a string.

    Scalars are JSON (``true``, ``null``, ``0.001``) except strings, kept as is;
    lists and empty dicts are JSON. Values longer than ``max_value_len`` become
    ``"<see recipe.yaml>"``. Keys are made MLflow-safe; beyond ``max_params`` keys
    the rest are left out and ``regimen.params_omitted`` says how many.
    """
    out: dict[str, str] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, Mapping) and obj:
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
            return
        value = obj if isinstance(obj, str) else json.dumps(obj, default=str)
        key = mlflow_key(prefix, allow_slash=False)
        if prefix and key not in out:
            out[key] = value if len(value) <= max_value_len else TOO_LONG

    walk("", redact(recipe))
    if len(out) > max_params:
        keys = list(out)[: max_params - 1]
        omitted = len(out) - len(keys)
        out = {k: out[k] for k in keys}
        out["regimen.params_omitted"] = f"{omitted} (see {RECIPE_ARTIFACT})"
    return out


def _tag_value(value: Any) -> str:
    text = redact_string(str(value))
    return text if len(text) <= MAX_TAG_VALUE else text[: MAX_TAG_VALUE - 3] + "..."


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=2.0, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance_tags() -> dict[str, str]:
    """Tags describing where a run comes from: versions, git state of cwd, python, host."""
    tags: dict[str, str] = {"regimen.python": platform.python_version()}
    try:
        tags["regimen.version"] = importlib.metadata.version("regimen")
    except importlib.metadata.PackageNotFoundError:
        from orchestrator import __version__

        tags["regimen.version"] = __version__
    for name in _VERSIONED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            tags[f"regimen.versions.{name}"] = importlib.metadata.version(name)
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["regimen.git_commit"] = tags["mlflow.source.git.commit"] = commit
        status = _git("status", "--porcelain", "--untracked-files=no")
        if status is not None:
            tags["regimen.git_dirty"] = "true" if status else "false"
    with contextlib.suppress(OSError):
        tags["regimen.host"] = socket.gethostname()
    with contextlib.suppress(Exception):
        tags["mlflow.user"] = getpass.getuser()
    return tags


def recipe_sha256(recipe_yaml: str) -> str:
    """sha256 of the ``recipe.yaml`` artifact for this text (its redacted form, UTF-8)."""
    return hashlib.sha256(redact_text(recipe_yaml).encode("utf-8")).hexdigest()


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return str(client.create_experiment(name, artifact_location=artifact_location))
        except Exception:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return str(exp.experiment_id)


def _log_chunks(client: Any, run_id: str, *, params: Any = (), tags: Any = ()) -> None:
    from mlflow.entities import Param, RunTag

    p = [Param(k, v) for k, v in params]
    t = [RunTag(k, v) for k, v in tags]
    for i in range(0, len(p), MAX_PER_BATCH):
        client.log_batch(run_id, params=p[i : i + MAX_PER_BATCH], synchronous=True)
    for i in range(0, len(t), MAX_PER_BATCH):
        client.log_batch(run_id, tags=t[i : i + MAX_PER_BATCH], synchronous=True)


def _clean_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {mlflow_key(k): _tag_value(v) for k, v in redact(dict(tags or {})).items()}


def open_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    *,
    recipe: Mapping[str, Any] | None = None,
    recipe_yaml: str | None = None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    artifact_location: str | None = None,
) -> str:
    """Create a RUNNING run (experiment created when missing) and return its run id.

    Tags: :func:`provenance_tags`, ``regimen.recipe_sha256`` (sha256 of the
    ``recipe.yaml`` artifact; equals sha256(recipe_yaml) when the recipe holds no
    secrets), ``mlflow.parentRunId`` for a child run, then ``tags`` (redacted).
    Params: :func:`flatten_params` of ``recipe``. Artifact ``recipe.yaml``: the
    redacted ``recipe_yaml`` (or a YAML dump of ``recipe`` when no text is given).
    ``artifact_location`` is used only when the experiment is created. If logging
    fails after the run was created, the run is ended FAILED before raising.
    """
    client = mlflow_client(tracking_uri)
    if recipe_yaml is None and recipe is not None:
        plain = json.loads(json.dumps(recipe, default=str))  # Paths, enums ... as strings
        recipe_yaml = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)
    artifact = redact_text(recipe_yaml) if recipe_yaml is not None else None
    all_tags = provenance_tags()
    if artifact is not None:
        all_tags["regimen.recipe_sha256"] = hashlib.sha256(artifact.encode("utf-8")).hexdigest()
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update(_clean_tags(tags))
    with mlflow_errors(f"create a run in experiment {experiment!r}", tracking_uri):
        exp_id = _experiment_id(client, experiment, artifact_location)
        run_id = str(client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id)
    try:
        with mlflow_errors(f"log the recipe of run {run_id}", tracking_uri):
            if recipe is not None:
                _log_chunks(client, run_id, params=flatten_params(recipe).items())
            if artifact is not None:
                client.log_text(run_id, artifact, RECIPE_ARTIFACT)
    except TrackingError as exc:
        with contextlib.suppress(Exception):
            end_run(tracking_uri, run_id, "FAILED", reason=str(exc))
        raise
    return run_id


class StoreOpening:
    """Open this process's client of ``tracking_uri`` in a background thread: import MLflow,
    and create (seed or migrate) a new sqlite store, while the driver's main thread starts Ray
    (``ray.init`` must run there: Ray's processes die with the thread that started them).
    :meth:`wait` joins it and raises what opening raised (a ``TrackingError``)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.error: BaseException | None = None
        self.began_at = time.time()
        self.ready_at: float | None = None
        self._thread = threading.Thread(target=self._open, name="regimen-store", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        try:
            with mlflow_errors("open the tracking store", self.tracking_uri):
                mlflow_client(self.tracking_uri)
            self.ready_at = time.time()
        except BaseException as exc:
            self.error = exc

    def wait(self) -> None:
        """Until the store is open (in short joins: Ctrl-C stays prompt); its error, if any."""
        while self._thread.is_alive():
            self._thread.join(timeout=0.2)
        if self.error is not None:
            raise self.error


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set (redacted, length-capped) tags on a run."""
    with mlflow_errors(f"tag run {run_id}", tracking_uri):
        _log_chunks(mlflow_client(tracking_uri), run_id, tags=_clean_tags(tags).items())


def end_run(
    tracking_uri: str,
    run_id: str,
    status: Literal["FINISHED", "FAILED", "KILLED"],
    reason: str | None = None,
) -> None:
    """End a run with ``status`` (tag ``regimen.end_reason`` = ``reason`` when given).

    Idempotent: a run that already ended keeps its first status and reason.
    Retries briefly (sqlite may be locked by a worker) before raising TrackingError.
    """
    if status not in TERMINAL:
        raise ValueError(f"status must be one of {TERMINAL}, not {status!r}")
    client = mlflow_client(tracking_uri)
    for attempt in range(3):
        try:
            with mlflow_errors(f"end run {run_id}", tracking_uri):
                if client.get_run(run_id).info.status in TERMINAL:
                    return
                if reason:
                    with contextlib.suppress(Exception):
                        client.set_tag(run_id, "regimen.end_reason", _tag_value(reason))
                client.set_terminated(run_id, status)
                return
        except TrackingError:
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))


def log_summary(
    tracking_uri: str,
    run_id: str,
    metrics: Mapping[str, float],
    tags: Mapping[str, Any] | None = None,
    *,
    step: int = 0,
    model_id: str | None = None,
) -> None:
    """Log final metrics (one point each at ``step``) and optional tags, synchronously;
    with ``model_id`` the metrics are linked to that logged model too."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    points = [
        Metric(mlflow_key(k), float(v), ts, step, model_id=model_id) for k, v in metrics.items()
    ]
    with mlflow_errors(f"log the summary of run {run_id}", tracking_uri):
        client = mlflow_client(tracking_uri)
        for i in range(0, len(points), 1000):
            client.log_batch(run_id, metrics=points[i : i + 1000], synchronous=True)
        if tags:
            _log_chunks(client, run_id, tags=_clean_tags(tags).items())


def log_event(
    tracking_uri: str, run_id: str, kind: str, step: int, payload: Mapping[str, Any] | None = None
) -> None:
    """Append a driver-side event (job start, resume, ...) to the artifact ``driver_events.jsonl``.

    Same format as the worker's events (:func:`orchestrator.tracking.sink.make_event`);
    the worker's sink owns ``events.jsonl``. :func:`read_events` merges both.
    """
    line = json.dumps(make_event(kind, step, payload), default=str)
    with mlflow_errors(f"log an event on run {run_id}", tracking_uri):
        client = mlflow_client(tracking_uri)
        old = read_artifact(client, run_id, DRIVER_EVENTS_ARTIFACT) or ""
        client.log_text(run_id, old + line + "\n", DRIVER_EVENTS_ARTIFACT)


def read_events(tracking_uri: str, run_id: str) -> list[dict[str, Any]]:
    """All events of a run (worker ``events.jsonl`` + driver ``driver_events.jsonl``) by time."""
    events: list[dict[str, Any]] = []
    with mlflow_errors(f"read the events of run {run_id}", tracking_uri):
        client = mlflow_client(tracking_uri)
        for name in (EVENTS_ARTIFACT, DRIVER_EVENTS_ARTIFACT):
            text = read_artifact(client, run_id, name) or ""
            events += [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    return sorted(events, key=lambda e: (e.get("time", 0), e.get("step", 0)))


def read_recipe_yaml(tracking_uri: str, run_id: str) -> str:
    """The run's ``recipe.yaml`` artifact text (secrets appear as "***")."""
    with mlflow_errors(f"read {RECIPE_ARTIFACT} of run {run_id}", tracking_uri):
        text = read_artifact(mlflow_client(tracking_uri), run_id, RECIPE_ARTIFACT)
    if text is None:
        raise TrackingError(
            f"run {run_id} has no {RECIPE_ARTIFACT} artifact: it was not started by Regimen "
            "(or its artifact store is unreachable); pass the recipe file instead."
        )
    return text
