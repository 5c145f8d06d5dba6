"""Watch how many MLflow calls run at once on the shared client of a sqlite store."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any


class OverlapWatch:
    """Stands in for an MLflow client: forwards every call, counting how many run at once.

    ``most`` is the largest number of calls that were in flight together. Each call holds
    ``hold_s`` longer, to widen the window in which calls could overlap.
    """

    def __init__(self, inner: Any, hold_s: float = 0.002):
        self.inner, self.hold_s = inner, hold_s
        self.now = self.most = self.calls = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.now += 1
                self.calls += 1
                self.most = max(self.most, self.now)
            try:
                time.sleep(self.hold_s)
                return attr(*args, **kwargs)
            finally:
                with self._lock:
                    self.now -= 1

        return call


@contextlib.contextmanager
def watched_sqlite_client(uri: str) -> Iterator[OverlapWatch]:
    """Put an :class:`OverlapWatch` under the turn-taking of the process's client for ``uri``
    (a sqlite store): it sees exactly the calls that got a turn."""
    from orchestrator.tracking.client import TakingTurns, mlflow_client

    shared = mlflow_client(uri)
    if not isinstance(shared, TakingTurns):
        raise AssertionError(f"the client of {uri} does not take turns: {type(shared)}")
    inner = shared.inner
    shared.inner = watch = OverlapWatch(inner)
    try:
        yield watch
    finally:
        shared.inner = inner
