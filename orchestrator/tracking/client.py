"""The one way Regimen talks to MLflow: a cached ``MlflowClient`` per tracking URI.

Every MLflow call in the package goes through :func:`mlflow_client` (never the fluent
``mlflow.start_run`` state, so several runs can be open in one process):

* one client per URI and process, so connection pools are shared by every caller;
* on a sqlite store the calls take turns (:data:`SQLITE_TURNS` at once, see
  :class:`TakingTurns`);
* a new sqlite store starts as a copy of a migrated, empty one (:func:`seed_sqlite_store`):
  MLflow's schema migrations run once per machine and MLflow version, not once per store;
* :func:`mlflow_errors` turns MLflow/transport failures into a ``TrackingError`` that names
  the URI and the fix; :func:`read_artifact` reads a small text artifact back.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import tempfile
import threading
import time
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
CACHE_ENV = "REGIMEN_CACHE_DIR"  # where the migrated store template lives (default ~/.cache)
logger = logging.getLogger(__name__)


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
    """This process's MlflowClient for ``tracking_uri`` (one per URI; sqlite calls take turns).

    A sqlite store that does not exist yet is seeded from the migrated template first."""
    from mlflow import MlflowClient

    seeded = seed_sqlite_store(tracking_uri)
    plain = MlflowClient(tracking_uri)
    if seeded is False:
        save_store_template(tracking_uri)
    return TakingTurns(plain) if tracking_uri.startswith("sqlite:") else plain


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory when the
    URI is), or None for other URIs and in-memory databases."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri.removeprefix("sqlite:///").split("?")[0]
    return Path(path) if path and path != ":memory:" else None


def store_template() -> Path:
    """The migrated, empty sqlite store of this MLflow version that new stores copy."""
    import importlib.metadata

    try:
        default = Path.home() / ".cache" / "regimen"
    except RuntimeError:  # no home directory (some containers)
        default = Path(tempfile.gettempdir()) / "regimen-cache"
    root = Path(os.environ.get(CACHE_ENV) or default)
    return root / f"mlflow-{importlib.metadata.version('mlflow')}-empty.db"


def seed_sqlite_store(tracking_uri: str) -> bool | None:
    """Before MLflow opens a sqlite store that does not exist: copy the template there.

    True when seeded; False when the store is new and no template exists yet (MLflow
    migrates it; :func:`save_store_template` keeps the result); None when there is nothing
    to do (not sqlite, the store exists). MLflow then finds every table, skips its
    migrations and creates its default experiment with this store's artifact root (the
    template has none). Never overwrites: a store created meanwhile by another process wins.
    """
    path = sqlite_path(tracking_uri)
    if path is None or path.exists():
        return None
    template = store_template()
    if not template.is_file():
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.{os.getpid()}.part")
        part.write_bytes(template.read_bytes())
        try:
            os.link(part, path)  # atomic, and fails rather than replace a store
        except FileExistsError:
            pass
        finally:
            part.unlink(missing_ok=True)
    except OSError as exc:  # MLflow creates the store the slow way
        logger.debug("could not seed %s from %s: %s", path, template, exc)
        return False
    return True


def save_store_template(tracking_uri: str) -> None:
    """Keep a copy of a store MLflow just created and migrated, less its default experiment
    (whose artifact location names that store's directory), as the template of new ones.
    Best effort: a cache that cannot be written only costs the next new store its migrations."""
    path, template = sqlite_path(tracking_uri), store_template()
    if path is None or not path.is_file() or template.exists():
        return
    part = template.with_name(f".{template.name}.{os.getpid()}.{time.time_ns()}.part")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        with (
            contextlib.closing(sqlite3.connect(path)) as src,
            contextlib.closing(sqlite3.connect(part)) as dst,
        ):
            src.backup(dst)  # consistent even while another process writes
            runs = dst.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
            others = dst.execute("SELECT COUNT(*) FROM experiments WHERE experiment_id != 0")
            if runs or others.fetchone()[0]:
                return  # not empty any more: no template from this one
            dst.execute("DELETE FROM experiments WHERE experiment_id = 0")
            dst.commit()
        os.replace(part, template)
    except (OSError, sqlite3.Error) as exc:
        logger.debug("could not keep the MLflow store template %s: %s", template, exc)
    finally:
        part.unlink(missing_ok=True)


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
