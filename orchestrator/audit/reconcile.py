"""Reconcile: end RUNNING runs whose driver is gone (KILLED, with the reason as a tag).

A job's driver (``regimen run``/``resume``/``rollback``, or a Ray Jobs entrypoint)
tags its run at open with ``regimen.driver.host``, ``regimen.driver.pid`` and the
process start time, and refreshes ``regimen.driver.heartbeat`` every 30 s from a
background thread (:mod:`orchestrator.tracking.record`). A RUNNING run is *stale* when:

1. its driver host is this host and no process with that pid exists, or one does but
   it started at another time (the pid was reused); or
2. its driver host is another host and the heartbeat is older than ``stale_after_s``
   (default 300 s, 10 missed beats);
3. it is a rollback segment (``regimen.role=segment``) and its job run has ended or is
   itself stale.

A RUNNING run without driver tags (logged by something else) is never touched. A stale
run's leftover metric spool (``<run_dir>/spool/<run_id>.metrics.jsonl``) is replayed
first; then its open segments and the run itself end KILLED with ``regimen.end_reason``
and ``regimen.reconciled_by``. ``regimen audit`` does this for every run it shows,
``regimen audit --reconcile`` for every RUNNING run of the store (or an experiment),
and ``regimen resume``/``rollback`` for the run they continue.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.audit.fetch import RunView
from orchestrator.rundir import RunDir
from orchestrator.tracking.record import DRIVER_HOST, DRIVER_PID, DRIVER_STARTED, HEARTBEAT

STALE_AFTER_S = 300.0
TERMINAL = ("FINISHED", "FAILED", "KILLED")
_PID_CLOCK_SLACK_S = 1.0


@dataclass(frozen=True)
class Judgement:
    """Whether a run is stale and why (``reason`` explains either way)."""

    stale: bool
    reason: str
    alive_here: bool = False  # the driver process is running on this very host


def judge(
    view: RunView,
    *,
    parent: tuple[str, Judgement | None] | None = None,
    now: float | None = None,
    host: str | None = None,
    stale_after_s: float = STALE_AFTER_S,
    pid_started: Callable[[int], float | None] | None = None,
) -> Judgement:
    """Apply the reconcile rule (module docstring) to one run.

    ``parent`` is ``(status, judgement)`` of the job run when ``view`` is a segment.
    ``now``, ``host`` and ``pid_started`` default to the real clock, host and processes.
    """
    if view.status != "RUNNING":
        return Judgement(False, f"ended {view.status}")
    if view.role == "segment":
        if parent is None:
            return Judgement(False, "segment of an unknown job run")
        status, verdict = parent
        if status in TERMINAL:
            return Judgement(True, f"its job run ended {status}")
        if verdict is not None and verdict.stale:
            return Judgement(True, f"its job run is stale: {verdict.reason}")
        return Judgement(False, "its job run is alive")
    tags: Mapping[str, str] = view.tags
    if DRIVER_PID not in tags:
        return Judgement(False, "no driver record (not started by this Regimen): not judged")
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    if pid_started is None:
        from orchestrator.tracking.record import process_started

        pid_started = process_started
    driver_host, pid = tags.get(DRIVER_HOST, ""), int(tags[DRIVER_PID])
    if driver_host == host:
        started = pid_started(pid)
        if started is None:
            return Judgement(True, f"driver process {pid} on {host} is gone")
        recorded = tags.get(DRIVER_STARTED, "")
        if recorded and abs(started - float(recorded)) > _PID_CLOCK_SLACK_S:
            return Judgement(True, f"driver process {pid} on {host} is gone (pid reused)")
        return Judgement(False, f"driver process {pid} on {host} is alive", alive_here=True)
    beat = float(tags.get(HEARTBEAT) or (view.start_ms or 0) / 1000)
    age = now - beat
    if age > stale_after_s:
        return Judgement(
            True,
            f"no heartbeat from driver on {driver_host} for {age:.0f} s (> {stale_after_s:.0f} s)",
        )
    return Judgement(False, f"driver on {driver_host} beat {age:.0f} s ago")


def _replay_leftover(uri: str, view: RunView) -> int:
    """Send a dead worker's unsent metrics (its spool in the run directory) to the run."""
    run_dir = view.tags.get("regimen.run_dir")
    if not run_dir:
        return 0
    from orchestrator.tracking.sink import replay_spool

    spool = RunDir(Path(run_dir)).metric_spool(view.run_id)
    if spool.exists() and spool.stat().st_size:
        with contextlib.suppress(Exception):
            return replay_spool(uri, view.run_id, spool)
    return 0


def end_stale(uri: str, view: RunView, reason: str, by: str) -> None:
    """End a stale run KILLED: replay its spool, end its open segments, tag why and by whom."""
    from orchestrator.tracking.runs import end_run, set_tags
    from orchestrator.tracking.segments import SEGMENT_ROLE, close_segments

    _replay_leftover(uri, view)
    text = f"driver gone: {reason}"
    if view.role != SEGMENT_ROLE:
        close_segments(uri, view.run_id, "KILLED", text)
    set_tags(uri, view.run_id, {"regimen.reconciled_by": by, "regimen.reconciled_at": time.time()})
    end_run(uri, view.run_id, "KILLED", reason=text)


def reconcile(
    uri: str,
    client: Any,
    views: list[RunView],
    *,
    by: str,
    stale_after_s: float = STALE_AFTER_S,
    dry_run: bool = False,
) -> list[tuple[RunView, Judgement]]:
    """Judge every RUNNING run of ``views`` and end the stale ones; ``(view, judgement)`` of
    every RUNNING run (``judgement.stale`` tells which were ended).

    Job runs are judged before their segments (a segment follows its job). The parent of
    a segment not in ``views`` is fetched.
    """
    known = {v.run_id: v for v in views}
    verdicts: dict[str, Judgement] = {}
    judged: list[tuple[RunView, Judgement]] = []
    for view in sorted(views, key=lambda v: v.role == "segment"):
        if view.status != "RUNNING":
            continue
        parent = None
        if view.role == "segment" and view.parent_id:
            job = known.get(view.parent_id)
            if job is None:
                with contextlib.suppress(Exception):
                    job = known[view.parent_id] = RunView.of(client.get_run(view.parent_id))
            if job is not None:
                verdict = verdicts.get(job.run_id)
                if verdict is None and job.status == "RUNNING":
                    verdict = judge(job, stale_after_s=stale_after_s)
                parent = (job.status, verdict)
        verdict = judge(view, parent=parent, stale_after_s=stale_after_s)
        verdicts[view.run_id] = verdict
        judged.append((view, verdict))
        if verdict.stale and not dry_run:
            end_stale(uri, view, verdict.reason, by)
            view.status = "KILLED"
            view.tags["regimen.end_reason"] = f"driver gone: {verdict.reason}"
    return judged
