"""Read runs back from MLflow for audits: a checked connection and plain run views.

Bad input is a :class:`~orchestrator.errors.UsageError` (exit 2) naming the fix: a
sqlite store that does not exist, a server that does not answer, credentials the
server refuses, an unknown run id or experiment name.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.tracking.redact import redact_string

ROLE = "regimen.role"
PARENT = "mlflow.parentRunId"


@dataclass
class RunView:
    """What an audit needs of one MLflow run, as plain data (fakes are easy in tests)."""

    run_id: str
    name: str
    status: str
    experiment_id: str = "0"
    start_ms: int | None = None
    end_ms: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, run: Any) -> RunView:
        """The view of an ``mlflow.entities.Run``."""
        info, data = run.info, run.data
        return cls(
            run_id=info.run_id,
            name=info.run_name or "",
            status=info.status,
            experiment_id=str(info.experiment_id),
            start_ms=info.start_time,
            end_ms=info.end_time,
            tags=dict(data.tags),
            params=dict(data.params),
            metrics=dict(data.metrics),
        )

    @property
    def short(self) -> str:
        """The first 8 characters of the run id."""
        return self.run_id[:8]

    @property
    def parent_id(self) -> str | None:
        """The MLflow parent run (sweep, job of a segment, or the run a resume continues)."""
        return self.tags.get(PARENT) or None

    @property
    def role(self) -> str:
        """``sweep``, ``segment`` (an automatic rollback) or ``job``."""
        return self.tags.get(ROLE) or "job"

    @property
    def kind(self) -> str:
        """How this stretch of training began: start, rollback, manual-rollback, resume, sweep."""
        if self.role == "sweep":
            return "sweep"
        reason = self.tags.get("regimen.reason", "")
        if reason == "resume":
            return "resume"
        if reason == "rollback":
            return "manual-rollback"
        if self.role == "segment" or reason.startswith("{"):
            return "rollback"
        return "start"

    @property
    def reason(self) -> dict[str, Any]:
        """The parsed ``regimen.reason`` tag (a detector's finding for automatic rollbacks)."""
        text = self.tags.get("regimen.reason", "")
        try:
            value = json.loads(text)
        except ValueError:
            return {"kind": text} if text else {}
        return value if isinstance(value, dict) else {"kind": text}


def _store_path(uri: str) -> Path | None:
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            return Path(uri[len(scheme) :])
    return Path(uri) if "://" not in uri else None


def _probe(uri: str) -> None:
    """GET ``/health`` of a tracking server; UsageError when nothing answers."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=10):
            return
    except urllib.error.HTTPError:
        return  # it answered (auth is checked below)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"MLflow tracking server {redact_string(uri)} is unreachable ({exc}): start it, "
            "or pass the right --tracking-uri (default $MLFLOW_TRACKING_URI)"
        ) from None


def connect(tracking_uri: str) -> Any:
    """The MLflow client for ``tracking_uri`` (the shared one of
    :mod:`orchestrator.tracking.client`), checked: the store exists, the server answers
    and accepts our credentials (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    path = _store_path(tracking_uri)
    if path is not None and not path.exists():
        raise UsageError(
            f"no MLflow store at {path}: run from the directory that holds it, or pass "
            "--tracking-uri (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
        )
    if tracking_uri.startswith(("http://", "https://")):
        _probe(tracking_uri)
    from orchestrator.tracking.client import mlflow_client

    client = mlflow_client(tracking_uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:
        text = str(exc)
        if any(s in text for s in ("401", "403", "Unauthorized", "Permission", "credentials")):
            raise UsageError(
                f"MLflow at {redact_string(tracking_uri)} refused the credentials: set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        raise UsageError(
            f"MLflow at {redact_string(tracking_uri)} failed: {redact_string(text)[:300]}"
        ) from None
    return client


def get_view(client: Any, run_id: str) -> RunView:
    """The view of ``run_id``; UsageError when the store has no such run."""
    try:
        return RunView.of(client.get_run(run_id))
    except Exception as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
            raise UsageError(
                f"no MLflow run {run_id!r} in this tracking store: check the id "
                "(regimen audit --experiment NAME lists them) and --tracking-uri"
            ) from None
        raise UsageError(f"cannot read run {run_id!r}: {redact_string(str(exc))[:300]}") from None


def search_views(
    client: Any, experiment_ids: Iterable[str], filter_string: str = ""
) -> list[RunView]:
    """Every run matching ``filter_string`` (all pages), oldest first."""
    views: list[RunView] = []
    token = None
    while True:
        page = client.search_runs(
            list(experiment_ids), filter_string=filter_string, max_results=1000, page_token=token
        )
        views += [RunView.of(r) for r in page]
        token = getattr(page, "token", None)
        if not token:
            break
    return sorted(views, key=lambda v: v.start_ms or 0)


def children(client: Any, view: RunView) -> list[RunView]:
    """Child runs of ``view`` (segments, resumes, sweep variants), oldest first."""
    return search_views(client, [view.experiment_id], f"tags.{PARENT} = '{view.run_id}'")


def experiment_ids(client: Any, name: str) -> list[str]:
    """The id of experiment ``name``; UsageError naming the experiments that exist."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UsageError(f"no MLflow experiment {name!r}; experiments here: {', '.join(names)}")
    return [str(exp.experiment_id)]


def artifact_text(client: Any, run_id: str, path: str) -> str | None:
    """The text of a run's artifact, or None when it has none (or it cannot be read)."""
    from orchestrator.tracking.client import read_artifact

    try:
        return read_artifact(client, run_id, path)
    except Exception:
        return None


def metric_history(client: Any, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    """``(step, value)`` of a metric, by step (the last value when a step was logged twice)."""
    points = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=_ts)}
    return sorted(points.items())


def _ts(metric: Any) -> int:
    return int(metric.timestamp)
