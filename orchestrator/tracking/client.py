"""The one way Regimen talks to MLflow: a cached ``MlflowClient`` per tracking URI.

Every MLflow call in the package goes through :func:`mlflow_client` (never the fluent
``mlflow.start_run`` state, so several runs can be open in one process):

* one client per URI and process, so connection pools are shared by every caller;
* on a sqlite store the calls take turns (:data:`SQLITE_TURNS` at once, see
  :class:`TakingTurns`);
* :func:`mlflow_errors` turns MLflow/transport failures into a ``TrackingError`` that names
  the URI and the fix; :func:`read_artifact` reads a small text artifact back.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.errors import TrackingError
from orchestrator.tracking.redact import redact_string

# sqlite has one writer at a time, and MLflow's SQLAlchemy pool (5 + 10 connections, 30 s
# wait) runs dry when dozens of driver threads (one per concurrent sweep variant, each with
# a heartbeat) wait on sqlite's lock together: "QueuePool limit ... reached". Calls on a
# sqlite store therefore take turns, fewer at once than the pool holds.
SQLITE_TURNS = 4
_TURNS = threading.BoundedSemaphore(SQLITE_TURNS)
_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


class TakingTurns:
    """An MlflowClient whose calls wait for a turn (at most ``SQLITE_TURNS`` of them run at
    once in this process, on every sqlite store together) instead of failing.

    ``inner`` is the wrapped client; attributes that are not callables pass through.
    """

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def in_turn(*args: Any, **kwargs: Any) -> Any:
            with _TURNS:
                return attr(*args, **kwargs)

        return in_turn


@functools.lru_cache(maxsize=16)
def mlflow_client(tracking_uri: str) -> Any:
    """This process's MlflowClient for ``tracking_uri`` (one per URI; sqlite calls take turns)."""
    from mlflow import MlflowClient

    plain = MlflowClient(tracking_uri)
    return TakingTurns(plain) if tracking_uri.startswith("sqlite:") else plain


@contextlib.contextmanager
def mlflow_errors(action: str, tracking_uri: str) -> Iterator[None]:
    """Turn any MLflow/transport failure into a TrackingError that names the fix."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(
            f"MLflow could not {action} at {redact_string(tracking_uri)}: "
            f"{type(exc).__name__}: {redact_string(str(exc))[:500]}. Check that the tracking "
            "server is running and that tracking.uri (or MLFLOW_TRACKING_URI) points to it."
        ) from exc


def read_artifact(client: Any, run_id: str, path: str) -> str | None:
    """The text of the run's artifact ``path`` (top level), or None when the run has none."""
    names = {f.path for f in client.list_artifacts(run_id)}
    if path not in names:
        return None
    quiet = _PROGRESS_BAR not in os.environ  # no tqdm bar on the CLI's stderr
    if quiet:
        os.environ[_PROGRESS_BAR] = "false"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, path, dst_path=tmp)
            return Path(local).read_text(encoding="utf-8")
    finally:
        if quiet:
            os.environ.pop(_PROGRESS_BAR, None)
