"""Wall-clock marks of where a job's time goes, from process start to the end of the run.

The driver and rank 0 each note the moments a phase ends (``mark``); marks are epoch
seconds (``time.time()``), so the two processes' marks line up on one axis. Rank 0's marks
travel back in the job's summary (``summary["startup"]``), the driver merges them with its
own (``JobResult.extra["startup"]``, printed by ``regimen run --json``) and logs the phase
lengths as ``startup/<phase>_s`` metrics of the run. Marking is a dict write: it stays on.

:data:`PHASES` names each phase by the marks that begin and end it; :func:`phase_seconds`
gives their lengths. Some phases overlap (Ray starts while the MLflow store opens; the
worker group starts while the MLflow run opens), so the
lengths of all phases may add up to more than the wall time; :func:`critical_path`, the
marks in time order, adds up to it exactly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

PROCESS_START = "driver.process_start"

# (label, begin mark, end mark), in the order a job meets them
PHASES: tuple[tuple[str, str, str], ...] = (
    ("driver_start", PROCESS_START, "driver.recipe"),  # python, CLI imports, recipe,
    ("ray_init", "ray.begin", "ray.ready"),
    ("mlflow_store", "store.begin", "store.ready"),
    ("mlflow_run_open", "run.begin", "run.ready"),
    ("worker_start", "workers.begin", "worker.entry"),
    ("worker_imports", "worker.entry", "worker.imported"),
    ("data_and_model", "worker.imported", "worker.model"),
    ("deepspeed_initialize", "worker.model", "worker.engine"),
    ("worker_mlflow", "worker.engine", "worker.tracking"),
    ("first_step", "worker.tracking", "worker.first_step"),
    ("steps", "worker.first_step", "worker.steps_done"),
    ("end_checkpoint", "worker.steps_done", "worker.checkpoint"),
    ("end_export", "worker.checkpoint", "worker.exported"),
    ("end_worker_close", "worker.exported", "worker.closed"),  # MLflow sink drained
    ("end_worker_return", "worker.closed", "fit.done"),
    ("end_driver_mlflow", "fit.done", "run.ended"),
)


class Timeline:
    """Named wall-clock marks (epoch seconds) of one process or one job."""

    def __init__(self, marks: Mapping[str, float] | None = None) -> None:
        self.marks: dict[str, float] = dict(marks or {})

    def mark(self, name: str, at: float | None = None) -> float:
        """Note that ``name`` happened now (or ``at``); the time noted."""
        when = time.time() if at is None else float(at)
        self.marks[name] = when
        return when

    def update(self, marks: Mapping[str, float] | None) -> None:
        """Take ``marks`` (another process's) in."""
        self.marks.update({str(k): float(v) for k, v in (marks or {}).items()})

    def to_dict(self) -> dict[str, float]:
        """The marks in time order, rounded to milliseconds."""
        return {k: round(v, 3) for k, v in sorted(self.marks.items(), key=lambda kv: kv[1])}


def process_start_time(pid: int | None = None) -> float | None:
    """When process ``pid`` (default: this one) started, epoch seconds; None if unknown."""
    try:
        import psutil

        return float(psutil.Process(pid or os.getpid()).create_time())
    except Exception:
        return None


def phase_seconds(marks: Mapping[str, float]) -> dict[str, float]:
    """The length of every :data:`PHASES` phase whose two marks are present (seconds)."""
    return {
        label: round(marks[end] - marks[begin], 3)
        for label, begin, end in PHASES
        if begin in marks and end in marks
    }


def critical_path(marks: Mapping[str, float]) -> list[tuple[str, float]]:
    """(mark, seconds since the previous mark) in time order: these add up to the span from
    the first mark to the last."""
    ordered = sorted(marks.items(), key=lambda kv: kv[1])
    return [(name, round(t - ordered[i - 1][1], 3) if i else 0.0) for i, (name, t) in
            enumerate(ordered)]  # fmt: skip


# this process's own marks (driver: process start, recipe, Ray, store); each job copies them
PROCESS = Timeline()
