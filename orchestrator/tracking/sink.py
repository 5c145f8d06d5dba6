"""Worker side: asynchronous, batched MLflow metrics that survive MLflow outages.

``MetricSink.log()`` only appends to an in-memory queue (a lock and a timestamp, no
I/O). A daemon thread sends it with ``log_batch`` (≤1000 points a call, on the process's
shared client, :func:`orchestrator.tracking.client.mlflow_client`) every
``flush_interval_s``, sooner on ``flush()`` or when the queue is half full; it wakes
rarely on purpose, since its work holds the GIL that log() needs.

When a send fails, unsent points go to an append-only JSONL spool
(``<spool_dir>/<run_id>.metrics.jsonl``), one warning is logged per outage, and the
thread retries with backoff (1 s doubling to 30 s), replaying the spool in file order
before newer points. Lines are released only after ``log_batch`` returned (a committed
byte offset in ``<spool>.offset``; the file is truncated once all is sent).

Delivery is at-least-once: a chunk is re-sent if it failed after the server stored it
(a lost response) or if the process died between a send and the offset commit. Points
keep the timestamp taken in ``log()``, so a re-sent point is identical and MLflow's SQL
stores drop it (same primary key): exactly-once in effect on SQL-backed servers.

Events (rollback, resume, lisa_switch, ...) go at once to
``<spool_dir>/<run_id>.events.jsonl``; the thread re-logs the whole file as the
artifact ``events.jsonl``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import posixpath
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from orchestrator.errors import TrackingError
from orchestrator.rundir import METRICS_SPOOL_SUFFIX
from orchestrator.tracking.client import mlflow_client
from orchestrator.tracking.redact import redact, redact_string

logger = logging.getLogger(__name__)

EVENTS_ARTIFACT = "events.jsonl"
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
Entry = tuple[int, int, dict[str, float]]  # (step, timestamp ms, {key: value})
_RESERVED = ("kind", "step", "time")
_BAD_KEY_CHARS = re.compile(r"[^\w.\- :/]")


def make_event(kind: str, step: int, payload: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The one event format: ``{"kind", "step", "time" (epoch s), **payload}``, secrets redacted.

    A payload key that clashes with kind/step/time is kept as ``payload_<key>``.
    """
    body = {(f"payload_{k}" if k in _RESERVED else k): v for k, v in (payload or {}).items()}
    return {"kind": str(kind), "step": int(step), "time": round(time.time(), 3), **redact(body)}


@functools.lru_cache(maxsize=4096)
def mlflow_key(key: str, *, allow_slash: bool = True) -> str:
    """``key`` made acceptable to MLflow (``[\\w.\\- :/]``, no empty/``..`` path parts, ≤250)."""
    parts = [p for p in _BAD_KEY_CHARS.sub("_", str(key)).split("/") if p not in ("", ".", "..")]
    out = ("/" if allow_slash else "_").join(parts)[:250]
    if not out or posixpath.normpath(out) != out:
        out = re.sub(r"[/.]", "_", out) or "_"
    return out


def _send(client: Any, run_id: str, entries: Iterable[Entry]) -> int:
    """Send points with ``log_batch`` in chunks of ≤ MAX_BATCH; return the number sent."""
    from mlflow.entities import Metric

    metrics = [Metric(mlflow_key(k), v, ts, s) for s, ts, vals in entries for k, v in vals.items()]
    for i in range(0, len(metrics), MAX_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_BATCH], synchronous=True)
    return len(metrics)


def _lines(entries: Iterable[Entry]) -> str:
    return "".join(json.dumps({"step": s, "ts": t, "m": m}) + "\n" for s, t, m in entries)


class _Spool:
    """Append-only JSONL of unsent points plus the committed byte offset (a sidecar file)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset_path = path.with_name(path.name + ".offset")
        self.lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size:
            with open(path, "rb+") as f:  # a crash may have torn the last line
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        self.points = sum(len(e[2]) for e in self._read(self._offset(), None)[0])

    def _offset(self) -> int:
        try:
            return int(self.offset_path.read_text())
        except (OSError, ValueError):
            return 0

    def _read(self, offset: int, limit: int | None) -> tuple[list[Entry], int]:
        entries: list[Entry] = []
        n = 0
        if not self.path.exists():
            return entries, offset
        with open(self.path, "rb") as f:
            f.seek(offset)
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                offset += len(raw)
                try:
                    rec = json.loads(raw)
                    entries.append((int(rec["step"]), int(rec["ts"]), dict(rec["m"])))
                    n += len(rec["m"])
                except (ValueError, KeyError, TypeError):
                    logger.warning("skipping a malformed line in metric spool %s", self.path)
                if limit is not None and n >= limit:
                    break
        return entries, offset

    def append(self, entries: list[Entry], text: str | None = None) -> None:
        """Append entries (``text`` = their pre-serialized lines, to keep the lock short)."""
        text = _lines(entries) if text is None else text
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            self.points += sum(len(e[2]) for e in entries)

    def read(self, limit: int = MAX_BATCH) -> tuple[list[Entry], int, int] | None:
        """The next uncommitted entries (≥1 line, ~``limit`` points) and their end offset."""
        with self.lock:
            start = self._offset()
            entries, end = self._read(start, limit)
        return None if end == start else (entries, start, end)

    def commit(self, start: int, end: int, points: int) -> None:
        """Release the lines in ``[start, end)`` after they were sent."""
        with self.lock:
            if self._offset() != start:
                return  # someone else committed meanwhile
            self.points = max(0, self.points - points)
            if end >= self.path.stat().st_size:
                self.path.write_bytes(b"")
                self.offset_path.unlink(missing_ok=True)
                self.points = 0
            else:
                tmp = self.offset_path.with_name(self.offset_path.name + ".tmp")
                tmp.write_text(str(end))
                tmp.replace(self.offset_path)


def _replay(client: Any, run_id: str, spool: _Spool, stop: Any = lambda: False) -> int:
    sent = 0
    while not stop() and (chunk := spool.read()) is not None:
        entries, start, end = chunk
        n = _send(client, run_id, entries)
        spool.commit(start, end, n)
        sent += n
    return sent


def _events_path(spool_path: Path) -> Path:
    return spool_path.with_name(spool_path.name.replace(METRICS_SPOOL_SUFFIX, ".events.jsonl"))


def replay_spool(tracking_uri: str, run_id: str, spool_path: str | Path) -> int:
    """Send every unsent point of a spool file to ``run_id`` (e.g. after a crash); return count.

    The sibling ``<run>.events.jsonl`` (when present) is re-logged as ``events.jsonl``.
    Do not run it on a spool that a live ``MetricSink`` is using. Raises
    ``TrackingError`` when MLflow fails; the unsent lines then stay in the file.
    """
    path = Path(spool_path)
    try:
        client = mlflow_client(tracking_uri)
        sent = _replay(client, run_id, _Spool(path))
        events = _events_path(path)
        if events != path and events.exists() and events.stat().st_size:
            client.log_text(run_id, events.read_text(encoding="utf-8"), EVENTS_ARTIFACT)
    except Exception as exc:
        raise TrackingError(
            f"replaying {path} into run {run_id} at {redact_string(tracking_uri)} failed: {exc}. "
            "The unsent points stay in the file; run replay_spool again once MLflow is reachable."
        ) from exc
    return sent


class MetricSink:
    """Asynchronous, batched MLflow metric logging: log() is O(1) and never blocks on the network.

    Thread-safe. Create one per run on rank 0; call ``close()`` at the end (also
    registered with ``atexit``). Points still unsent after ``close()`` stay in
    ``spool_path`` and can be sent later with :func:`replay_spool`.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        flush_interval_s: float = 1.0,
        max_queue: int = 100_000,
        spool_dir: str | Path | None = None,
    ):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._interval, self._max_queue = flush_interval_s, max_queue
        self._early = max(MAX_BATCH, max_queue // 2)  # queue size that wakes the sender early
        root = Path(spool_dir) if spool_dir else Path(tempfile.mkdtemp(prefix="regimen-spool-"))
        name = re.sub(r"[^\w.-]", "_", run_id)
        self._spool = _Spool(root / f"{name}{METRICS_SPOOL_SUFFIX}")
        self.spool_path: Path = self._spool.path
        self.events_path: Path = _events_path(self.spool_path)
        old = self.events_path.read_text("utf-8") if self.events_path.exists() else ""
        self._events: list[str] = [ln for ln in old.splitlines() if ln.strip()]
        self._events_sent = 0
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # wakes the sender thread
        self._done = threading.Condition(self._lock)  # wakes flush() callers
        self._queue: deque[Entry] = deque()
        self._queued = 0
        self._inflight: list[Entry] | None = None
        self._inflight_n = 0
        self._moving = 0  # points between the queue and the spool (outage path)
        self._wake = self._stop = self._closing = self._warned_closed = False
        self._flushing = 0
        self._outage = False
        self._client: Any = None
        self._bad_keys: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="regimen-metric-sink", daemon=True)
        self._thread.start()
        atexit.register(self.close, 10.0)

    # ---- hot path -------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Enqueue one point per metric at ``step`` (timestamp taken now). Never drops points:
        when the queue holds ``max_queue`` points (or after close) they go to the spool file.
        Values are converted with ``float()`` here (a CUDA tensor would sync: pass floats);
        values that are not numbers (``None``) are skipped with one warning per key."""
        ts = int(time.time() * 1000)
        try:
            values = {k: float(v) for k, v in metrics.items()}
        except (TypeError, ValueError):
            values = self._numeric(metrics)
        if not values:
            return
        entry = (int(step), ts, values)
        with self._lock:
            if not self._stop and self._queued + len(values) <= self._max_queue:
                self._queue.append(entry)
                self._queued += len(values)
                if self._queued >= self._early and not self._wake:
                    self._wake = True
                    self._work.notify()
                return
            if self._stop and not self._warned_closed:
                self._warned_closed = True
                logger.warning("MetricSink.log() after close(): points go to %s", self.spool_path)
        self._spool.append([entry])

    def _numeric(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Slow path of log(): keep what converts to float, warn once per key about the rest."""
        values = {}
        for k, v in metrics.items():
            try:
                values[k] = float(v)
            except (TypeError, ValueError):
                if k not in self._bad_keys:
                    self._bad_keys.add(k)
                    logger.warning("metric %r=%r is not a number: not logged", k, v)
        return values

    def event(self, kind: str, step: int, **payload: Any) -> None:
        """Record an event; it is written to ``events.jsonl`` (local file now, artifact soon)."""
        line = json.dumps(make_event(kind, step, payload), default=str)
        with self._lock:
            self._events.append(line)
            with open(self.events_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
            self._work.notify()

    # ---- control --------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Points logged but not yet confirmed sent (queued, in flight, or spooled)."""
        with self._lock:
            return self._queued + self._inflight_n + self._moving + self._spool.points

    def _idle(self) -> bool:
        return (
            self._queued + self._inflight_n + self._moving + self._spool.points == 0
            and self._events_sent >= len(self._events)
        )

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Block until every point and event so far is sent; True if so, False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._flushing += 1
            try:
                self._wake = True
                self._work.notify()
                while not self._idle():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._stop or not self._thread.is_alive():
                        return False
                    self._done.wait(min(remaining, 0.5))
                return True
            finally:
                self._flushing -= 1

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush (up to ``timeout_s``), stop the thread and spool whatever is left. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self.flush(timeout_s)
        with self._lock:
            self._stop = True
            self._work.notify()
            left = list(self._queue) + (self._inflight or [])
            self._queue.clear()
            self._queued, self._inflight, self._inflight_n = 0, None, 0
            if left:
                self._spool.append(left)
        self._thread.join(timeout=2.0)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if self.pending:
            msg = "MetricSink closed with %d unsent points in %s: send them with replay_spool()"
            logger.warning(msg, self.pending, self.spool_path)

    # ---- sender thread --------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.0
        while True:
            with self._lock:
                wait = (min(backoff, 1.0) if self._flushing else backoff) or self._interval
                deadline = time.monotonic() + wait
                while not self._stop:  # during backoff only flush()/close() cut the wait short
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or (self._wake and (not backoff or self._flushing)):
                        break
                    self._work.wait(remaining)
                if self._stop:
                    self._done.notify_all()
                    return
                self._wake = False
            try:
                ok = self._cycle()
            except Exception as exc:  # never let the thread die
                ok = False
                self._failed(exc)
            if ok and self._outage:
                self._outage = False
                logger.warning("MLflow is reachable again; spooled metrics were replayed")
            backoff = 0.0 if ok else min(max(2 * backoff, 1.0), 30.0)
            with self._lock:
                self._done.notify_all()

    def _failed(self, exc: BaseException) -> None:
        with self._lock:  # move everything queued to the spool, keeping the lock short
            moving = list(self._queue)
            self._queue.clear()
            self._moving, self._queued = self._queued, 0
        text = _lines(moving)
        with self._lock:
            self._spool.append(moving, text)
            self._moving = 0
        if not self._outage:
            self._outage = True
            logger.warning(
                "MLflow at %s failed for run %s (%s: %s); spooling metrics to %s and retrying",
                redact_string(self.tracking_uri),
                self.run_id,
                type(exc).__name__,
                str(exc)[:300],
                self.spool_path,
            )

    def _cycle(self) -> bool:
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        if self._spool.points:
            _replay(self._client, self.run_id, self._spool, lambda: self._stop)  # older first
        while True:
            with self._lock:
                batch = self._take()
            if not batch:
                break
            try:
                _send(self._client, self.run_id, batch)
            except Exception:
                with self._lock:
                    if self._inflight is batch:  # close() may have spooled it already
                        self._spool.append(batch)
                        self._inflight, self._inflight_n = None, 0
                raise
            with self._lock:
                if self._inflight is batch:
                    self._inflight, self._inflight_n = None, 0
        with self._lock:
            count, text = len(self._events), "".join(e + "\n" for e in self._events)
        if count > self._events_sent:
            self._client.log_text(self.run_id, text, EVENTS_ARTIFACT)
            with self._lock:
                self._events_sent = max(self._events_sent, count)
        return True

    def _take(self) -> list[Entry] | None:
        """Pop queued entries worth ≤ MAX_BATCH points (at least one) as the in-flight batch."""
        batch: list[Entry] = []
        n = 0
        while self._queue and (not batch or n + len(self._queue[0][2]) <= MAX_BATCH):
            entry = self._queue.popleft()
            batch.append(entry)
            n += len(entry[2])
        self._queued -= n
        self._inflight, self._inflight_n = (batch, n) if batch else (None, 0)
        return batch or None
