"""What a job reports: the event log, rank 0's metric sink and lineage segments, the summary,
every rank's system metrics.

Every rank keeps the event log (the summary carries it); only rank 0 with a tracking URI
and a run id streams metrics and events to MLflow, through an async
:class:`~orchestrator.tracking.sink.MetricSink`. After an in-place rollback the sink
switches to a new child run (a lineage segment). Every rank of a tracked job samples its
machine into the job's run (``tracking.system_metrics``,
:mod:`orchestrator.tracking.system`), from :meth:`Reporter.open` to :meth:`Reporter.close`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.rundir import RunDir


class Reporter:
    """The event log of one rank, and rank 0's MLflow sink for metrics, events and segments."""

    def __init__(
        self,
        run_dir: RunDir,
        rank: int,
        tracking_uri: str | None,
        run_id: str | None,
        node_id: str | None = None,
    ):
        self.run_dir = run_dir
        self.rank = rank
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.node_id = node_id  # this rank's system-metrics name (None: ``rank<R>``)
        self.events: list[dict[str, Any]] = []
        self.sink: Any = None
        self.system: Any = None  # this rank's SystemMetrics while open
        self.segment_run_id: str | None = run_id

    @property
    def tracked(self) -> bool:
        """Whether this rank streams to MLflow (rank 0 of a tracked job)."""
        return self.rank == 0 and bool(self.tracking_uri) and bool(self.run_id)

    def emit(self, kind: str, step: int, payload: Mapping[str, Any]) -> None:
        """Append an event at ``step`` to the log (and send it to MLflow when tracked and
        open); a ``step`` in ``payload`` names the step the event is about instead."""
        event = {"kind": kind, "step": step, "time": time.time(), **payload}
        self.events.append(event)
        if self.sink is not None:
            extra = {k: v for k, v in event.items() if k not in ("kind", "step", "time")}
            self.sink.event(kind, event["step"], **extra)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Metrics of ``step`` to MLflow (a no-op when not tracked)."""
        if self.sink is not None and metrics:
            self.sink.log(step, dict(metrics))

    def flush(self, timeout_s: float = 5.0) -> None:
        """Let the sink catch up (before a checkpoint: what it records is in MLflow)."""
        if self.sink is not None:
            self.sink.flush(timeout_s=timeout_s)

    def open(self, recipe: Any, data: Any, engine: Any, world_size: int) -> None:
        """Every rank of a tracked job: start its system metrics. Rank 0: open the sink,
        record the worker's facts and the events so far; after a restart, close the
        segments the dead worker left open."""
        self._start_system_metrics(recipe.tracking)
        if not self.tracked:
            return
        from orchestrator.recipe.loader import recipe_dict
        from orchestrator.tracking.record import log_worker_record  # best effort, never raises
        from orchestrator.tracking.sink import MetricSink

        uri, run_id = self.tracking_uri or "", self.run_id or ""
        self.sink = MetricSink(uri, run_id, spool_dir=self.run_dir.spool)
        log_worker_record(
            uri, run_id, recipe=recipe_dict(recipe), fingerprint=data.fingerprint,
            description=data.description, ds_config=getattr(engine, "config", None),
            world_size=world_size, device=getattr(engine, "device", "cpu"),
        )  # fmt: skip
        for e in self.events:  # emitted while building (resume, manual_rollback): record them
            extra = {k: v for k, v in e.items() if k not in ("kind", "step", "time")}
            self.sink.event(e["kind"], e["step"], **extra)
        if any(e["kind"] == "resume" for e in self.events):  # a restart: close dead segments
            from orchestrator.tracking.segments import close_segments

            with contextlib.suppress(Exception):
                close_segments(uri, run_id, "KILLED", "worker died; job restarted")

    def _start_system_metrics(self, tracking: Any) -> None:
        if not (tracking.system_metrics and self.tracking_uri and self.run_id):
            return
        from orchestrator.tracking.system import SystemMetrics, node_id_of

        self.system = SystemMetrics.start(
            self.tracking_uri,
            self.run_id,  # the job's run, also after a rollback: the machine is the job's
            self.node_id or node_id_of(self.rank),
            tracking.system_metrics_interval_s,
        )

    def new_segment(
        self, kind: str, restored_step: int, payload: dict[str, Any], segment: int, rollbacks: int
    ) -> None:
        """Rank 0: a child MLflow run for what follows; the sink switches to it."""
        if self.sink is None or not self.tracking_uri or not self.run_id:
            return
        from orchestrator.tracking.segments import open_segment_run
        from orchestrator.tracking.sink import MetricSink

        self.sink.close(timeout_s=10.0)
        self.segment_run_id = open_segment_run(
            self.tracking_uri, self.run_id, segment=segment, kind=kind,
            restored_step=restored_step, payload=payload, rollbacks=rollbacks,
        )  # fmt: skip
        self.sink = MetricSink(self.tracking_uri, self.segment_run_id, spool_dir=self.run_dir.spool)

    def close(self, status: str) -> None:
        """Stop this rank's system metrics (its last samples logged); drain the sink; end the
        current rollback segment run (the controller ends the job's)."""
        system, self.system = self.system, None
        if system is not None:
            system.stop()
        if self.sink is None:
            return
        self.sink.close()
        if self.segment_run_id in (None, self.run_id):
            return
        from orchestrator.tracking.segments import end_segment

        with contextlib.suppress(Exception):
            end_segment(self.tracking_uri or "", self.segment_run_id or "", status)  # type: ignore[arg-type]

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Rank 0: the crash-safe record of the job's result (``summary.json``)."""
        if self.rank == 0:
            self.run_dir.write_summary(summary)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary rank 0 wrote at the end of a job, or None."""
    return RunDir(run_dir).read_summary()
