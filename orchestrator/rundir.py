"""The run directory: the one module that knows its layout and its crash-safe records.

One job (and every ``regimen resume`` / ``rollback`` segment after it) lives in one
directory, ``<checkpoint.storage or local_dir>/<run id>/``::

    checkpoints/step-N/        committed checkpoints (CheckpointStore)
    abandoned/<label>/step-N/  checkpoints a manual rollback moved out of the timeline
    spool/<run>.metrics.jsonl  metric points the workers could not send to MLflow yet
    ray/                       Ray Train's storage for the job
    faults/<fault>.fired       fault-injection markers that must survive a restart
    summary.json               rank 0's summary of the finished (or stopped) job
    stopped.json               a STOP verdict; a Ray Train restart must not retry it
    segment.json               a manual rollback's skip ranges / LR scale for the workers
    export/                    the final model as a Hugging Face directory (save_pretrained)
    logs/driver.log            the driver's library log: Ray, MLflow, ... (orchestrator.screen),
                               one section per command that ran the job (run, resume, ...)

Object storage mirrors ``checkpoints``, ``abandoned`` and ``export`` under the same names.
Records are written with :func:`atomic_write_json` (temp file, fsync, rename, fsync of the
directory), so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
ABANDONED = "abandoned"
SPOOL = "spool"
RAY = "ray"
FAULTS = "faults"
SUMMARY = "summary.json"
STOPPED = "stopped.json"
SEGMENT = "segment.json"
EXPORT = "export"
LOGS = "logs"
DRIVER_LOG = "driver.log"
METRICS_SPOOL_SUFFIX = ".metrics.jsonl"  # a metric sink's spool: <run id> + this


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that the renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same directory, fsync,
    rename over ``path``, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


@dataclass(frozen=True)
class Stopped:
    """``stopped.json``: a technique stopped training at ``step`` for ``reason``; with
    ``bad_rank``, because that rank's hardware looks faulty."""

    step: int
    reason: str
    bad_rank: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as written to disk."""
        out: dict[str, Any] = {"step": self.step, "reason": self.reason}
        if self.bad_rank is not None:
            out["bad_rank"] = self.bad_rank
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stopped:
        """The record read back (``step`` may be missing in hand-written files)."""
        bad = data.get("bad_rank")
        return cls(
            step=int(data.get("step", -1)),
            reason=str(data["reason"]),
            bad_rank=int(bad) if bad is not None else None,
        )


@dataclass(frozen=True)
class Segment:
    """``segment.json``: what ``regimen rollback`` asks the workers of segment ``segment`` to
    apply once, when they start from the checkpoint of ``from_step``."""

    segment: int
    from_step: int
    skip_ranges: list[tuple[int, int]] = field(default_factory=list)
    lr_scale: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as written to disk."""
        return {
            "segment": self.segment,
            "from_step": self.from_step,
            "skip_ranges": [[int(a), int(b)] for a, b in self.skip_ranges],
            "lr_scale": self.lr_scale,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Segment:
        """The record read back."""
        lr = data.get("lr_scale")
        return cls(
            segment=int(data["segment"]),
            from_step=int(data["from_step"]),
            skip_ranges=[(int(a), int(b)) for a, b in data.get("skip_ranges") or []],
            lr_scale=float(lr) if lr is not None else None,
        )


@dataclass(frozen=True)
class RunDir:
    """One job's run directory (see the module docstring for the layout)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def under(cls, base: str | Path, run_id: str) -> RunDir:
        """The run directory of ``run_id`` under the storage root ``base`` (made absolute)."""
        return cls(Path(base).resolve() / run_id)

    @property
    def name(self) -> str:
        """The directory's name: the job's first MLflow run id."""
        return self.root.name

    def create(self) -> RunDir:
        """Make the directory (and its parents) if missing; returns self."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    # -- folders -------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        """Committed checkpoints (``CheckpointStore``'s root)."""
        return self.root / CHECKPOINTS

    @property
    def abandoned(self) -> Path:
        """Checkpoints manual rollbacks moved out of the timeline, one folder per rollback."""
        return self.root / ABANDONED

    def abandoned_for(self, label: str) -> Path:
        """Where the checkpoints one rollback (``label``, e.g. ``rollback-2``) discarded go."""
        return self.abandoned / label

    def abandoned_sets(self) -> list[Path]:
        """Every folder under :attr:`abandoned`, sorted by name."""
        return sorted(p for p in self.abandoned.glob("*") if p.is_dir())

    @property
    def spool(self) -> Path:
        """The metric sinks' spool folder (points MLflow has not confirmed yet)."""
        return self.root / SPOOL

    def metric_spool(self, run_id: str) -> Path:
        """The metric spool file of MLflow run ``run_id``."""
        return self.spool / f"{run_id}{METRICS_SPOOL_SUFFIX}"

    def metric_spools(self) -> Iterator[Path]:
        """Every metric spool file, sorted by name."""
        yield from sorted(self.spool.glob(f"*{METRICS_SPOOL_SUFFIX}"))

    @property
    def ray(self) -> Path:
        """Ray Train's storage for this job."""
        return self.root / RAY

    @property
    def export(self) -> Path:
        """The final model, written by save_pretrained when a run ends (``engine/export``)."""
        return self.root / EXPORT

    @property
    def logs(self) -> Path:
        """Log files of the job."""
        return self.root / LOGS

    @property
    def driver_log(self) -> Path:
        """What Ray, MLflow and the other libraries logged on the driver (the terminal
        shows Regimen's own lines; ``--verbose`` shows these too)."""
        return self.logs / DRIVER_LOG

    @property
    def faults(self) -> Path:
        """Fault-injection markers (``<fault>.fired``)."""
        return self.root / FAULTS

    # -- records -------------------------------------------------------------------------
    @property
    def summary(self) -> Path:
        """``summary.json``."""
        return self.root / SUMMARY

    @property
    def stopped(self) -> Path:
        """``stopped.json``."""
        return self.root / STOPPED

    @property
    def segment(self) -> Path:
        """``segment.json``."""
        return self.root / SEGMENT

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Record the job's summary (rank 0, at the end of the job)."""
        atomic_write_json(self.summary, summary)

    def read_summary(self) -> dict[str, Any] | None:
        """The summary rank 0 wrote at the end of the job, or None."""
        data = _read_json(self.summary)
        return dict(data) if data is not None else None

    def write_stopped(self, stopped: Stopped) -> None:
        """Record a STOP verdict so that no restart of the job retries it."""
        atomic_write_json(self.stopped, stopped.to_json())

    def read_stopped(self) -> Stopped | None:
        """The STOP verdict on record, or None."""
        data = _read_json(self.stopped)
        return Stopped.from_json(data) if data is not None else None

    def clear_stopped(self) -> None:
        """Forget a STOP verdict (a person decided to go on: ``regimen resume``)."""
        self.stopped.unlink(missing_ok=True)

    def write_segment(self, segment: Segment) -> None:
        """Hand a manual rollback's skip ranges / LR scale to the workers."""
        atomic_write_json(self.segment, segment.to_json())

    def read_segment(self) -> Segment | None:
        """The manual rollback's instructions on record, or None."""
        data = _read_json(self.segment)
        return Segment.from_json(data) if data is not None else None


__all__ = [
    "ABANDONED",
    "CHECKPOINTS",
    "DRIVER_LOG",
    "EXPORT",
    "FAULTS",
    "LOGS",
    "METRICS_SPOOL_SUFFIX",
    "RAY",
    "SEGMENT",
    "SPOOL",
    "STOPPED",
    "SUMMARY",
    "RunDir",
    "Segment",
    "Stopped",
    "atomic_write_bytes",
    "atomic_write_json",
    "fsync_dir",
]
