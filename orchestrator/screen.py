"""What the terminal shows while a command trains or exports: Regimen's own lines only.

Ray, MLflow (and alembic under it), DeepSpeed, transformers, torch ... log on the driver as
they start: Ray's token-authentication warning, "Started a local Ray instance", MLflow's
"Creating initial MLflow database tables". :class:`LibraryLog` routes those loggers (and
Python's ``warnings``, through ``logging.captureWarnings``) into a capture file while a
command runs; :meth:`LibraryLog.keep_in` appends the capture to each job's
``logs/driver.log`` (:attr:`orchestrator.rundir.RunDir.driver_log`) once the jobs exist.
The chatter starts before any run directory does (Ray starts first, the MLflow run opens
next, and the run directory is named by the run id), hence the capture file first and the
copy after; a sweep's variants each get the whole capture. With ``verbose`` the libraries'
own handlers stay too, so their lines also reach the terminal as they would without Regimen.

Regimen's own warnings (the ``orchestrator`` loggers) always reach the terminal. Ray's
processes (GCS, raylet, the Ray Train controller, the workers) write to Ray's session logs,
not to this terminal: ``ray.init(log_to_driver=False)`` unless ``REGIMEN_WORKER_LOGS=1``
(``orchestrator.cluster.launch.ensure_ray``).

:func:`closing_lines` is the end of the screen: how to look at what ran (the ``mlflow ui``
command for the store in use, ``regimen audit``, the checkpoint, the exported model, the
log file).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from orchestrator.rundir import RunDir

# Loggers of the libraries the driver uses, by their top name (children follow them).
LIBRARY_LOGGERS = (
    "ray",
    "mlflow",
    "alembic",
    "sqlalchemy",
    "huey",
    "DeepSpeed",  # deepspeed.utils.logging's logger (to stdout)
    "deepspeed",
    "transformers",
    "torch",
    "datasets",
    "huggingface_hub",
    "accelerate",
    "peft",
    "urllib3",
    "filelock",
    "py.warnings",  # warnings.warn, with logging.captureWarnings
)
# MLflow *replaces* its loggers' handlers when imported (``logger.handlers = [...]``), which
# would undo a takeover. While a command runs, an MLflow not imported yet is told not to
# (MLFLOW_CONFIGURE_LOGGING=false), so it can be imported later, off the critical path (the
# store opens in a thread while Ray starts: importing it first cost the driver 0.9 s), and
# its levels are set here instead, as MLflow sets them. Libraries that add a handler
# (``addHandler``: Ray, DeepSpeed, transformers) may be imported at any time (see _Routed).
MLFLOW_CONFIGURE = "MLFLOW_CONFIGURE_LOGGING"
MLFLOW_LEVELS = {"sqlalchemy.engine": "WARNING", "alembic": "WARNING", "huey": "WARNING"}
CAPTURE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class _Saved:
    handlers: list[logging.Handler]
    propagate: bool


class _Routed(list):  # type: ignore[type-arg]
    """A taken-over logger's handler list. A handler a library adds while the command
    runs (``Logger.addHandler`` appends here: DeepSpeed's stdout handler, created on its
    import, Ray's on its) is held back, not used, unless ``verbose``; it is the
    library's again once the command ends."""

    def __init__(self, handlers: list[logging.Handler], verbose: bool) -> None:
        super().__init__(handlers)
        self.verbose = verbose
        self.held: list[logging.Handler] = []

    def append(self, handler: logging.Handler) -> None:
        """Hold a library's new handler back (use it too when verbose)."""
        self.held.append(handler)
        if self.verbose:  # the library's own now stands in for the root's
            self[:] = [h for h in self if not isinstance(h, _TerminalHandler)]
            super().append(handler)


class LibraryLog:
    """Route the libraries' log records into a capture file for one command (a context
    manager); with ``verbose`` they reach the terminal too. ``stream`` is where Regimen's
    own warnings go (default: ``sys.stderr`` when each is written); ``title`` heads the
    section :meth:`keep_in` writes.

    On leaving, the capture file is deleted once kept in a run directory (or when empty);
    otherwise it stays where :attr:`path` says, and a command that failed says so on the
    terminal."""

    def __init__(
        self,
        *,
        verbose: bool = False,
        stream: IO[str] | None = None,
        loggers: Sequence[str] = LIBRARY_LOGGERS,
        title: str = "regimen",
    ) -> None:
        self.verbose = verbose
        self.title = title
        self.stream = stream
        self.loggers = tuple(loggers)
        self.path: Path | None = None
        self.kept: list[Path] = []
        self._saved: dict[str, _Saved] = {}
        self._levels: dict[str, int] = {}
        self._configure_set = False
        self._handler: logging.Handler | None = None
        self._own: logging.Handler | None = None

    def __enter__(self) -> LibraryLog:
        if "mlflow" not in sys.modules and MLFLOW_CONFIGURE not in os.environ:
            os.environ[MLFLOW_CONFIGURE] = "false"
            self._configure_set = True
            mlflow_level = os.environ.get("MLFLOW_LOGGING_LEVEL", "INFO").upper()
            for name, level in {"mlflow": mlflow_level, **MLFLOW_LEVELS}.items():
                logger = logging.getLogger(name)
                self._levels[name] = logger.level
                logger.setLevel(level)
        fd, name = tempfile.mkstemp(prefix="regimen-driver-", suffix=".log")
        os.close(fd)
        self.path = Path(name)
        self._handler = _CaptureHandler(self.path)
        for logger_name in self.loggers:
            logger = logging.getLogger(logger_name)
            self._saved[logger_name] = _Saved(list(logger.handlers), logger.propagate)
            handlers: list[logging.Handler] = [self._handler]
            if self.verbose:  # as without Regimen: their own handlers, or the root's
                handlers += logger.handlers or [_TerminalHandler(self.stream, CAPTURE_FORMAT)]
            logger.handlers = _Routed(handlers, self.verbose)
            logger.propagate = False
        logging.captureWarnings(True)
        self._own = _TerminalHandler(self.stream, "warning: %(message)s")
        self._own.setLevel(logging.WARNING)
        logging.getLogger("orchestrator").addHandler(self._own)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        logging.captureWarnings(False)
        for logger_name, saved in self._saved.items():
            logger = logging.getLogger(logger_name)
            held = logger.handlers.held if isinstance(logger.handlers, _Routed) else []
            # a library configured during the command keeps what it set (no propagation)
            logger.handlers = saved.handlers + held
            logger.propagate = saved.propagate and not held
        self._saved.clear()
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._levels.clear()
        if self._configure_set:
            os.environ.pop(MLFLOW_CONFIGURE, None)
            self._configure_set = False
        if self._own is not None:
            logging.getLogger("orchestrator").removeHandler(self._own)
        if self._handler is not None:
            self._handler.close()
        if self.path is None:
            return
        if self.kept or not self.path.stat().st_size:  # it lives on in the run directories
            self.path.unlink(missing_ok=True)
            self.path = None
        elif exc_type is not None:
            print(
                f"the libraries' log (Ray, MLflow, ...): {self.path}",
                file=self.stream or sys.stderr,
            )

    def keep_in(self, run_dirs: Iterable[str | Path | None]) -> list[Path]:
        """Append the capture so far to ``logs/driver.log`` of each run directory given
        (None and missing ones skipped); the files written. A resumed job appends under
        a header, so a run directory's log holds every command that ran in it."""
        if self.path is None:
            return []
        if self._handler is not None:
            self._handler.flush()
        text = self.path.read_text(encoding="utf-8", errors="replace")
        header = f"=== {self.title} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n"
        written = []
        for run_dir in dict.fromkeys(str(d) for d in run_dirs if d):
            if not Path(run_dir).is_dir():
                continue
            target = RunDir(Path(run_dir)).driver_log
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a", encoding="utf-8") as f:
                f.write(header + text)
            written.append(target)
        self.kept += written
        return written


class _CaptureHandler(logging.FileHandler):
    """The capture file's handler, in one format for every library: ``ray.init`` sets its
    own format on each handler of the ``ray`` logger (``setup_logger``), which would be
    this shared one too."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8")
        super().setFormatter(logging.Formatter(CAPTURE_FORMAT))

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        """Keep the capture's format."""


class _TerminalHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes to ``stream``, or to ``sys.stderr`` as it is at each
    record (pytest and typer's runner swap it)."""

    def __init__(self, stream: IO[str] | None, fmt: str) -> None:
        super().__init__(stream or sys.stderr)
        self.fixed = stream
        self.setFormatter(logging.Formatter(fmt))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = self.fixed or sys.stderr
        super().emit(record)


# -- the closing lines -----------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What the closing lines say about one job (from a ``JobResult``)."""

    variant: str
    run_id: str
    status: str
    checkpoint: str | None = None
    export: str | None = None
    run_dir: str | None = None
    parent_run_id: str | None = None
    logs: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, result: Any) -> Job:
        """From a ``JobResult`` (``checkpoint``, ``run_dir``, ``extra["export"]``)."""
        exported = (getattr(result, "extra", None) or {}).get("export") or {}
        return cls(
            variant=result.variant,
            run_id=result.run_id,
            status=result.status,
            checkpoint=result.checkpoint,
            export=exported.get("path"),
            run_dir=result.run_dir,
            parent_run_id=getattr(result, "parent_run_id", None),
        )


def without_credentials(uri: str) -> str:
    """``uri`` with any ``user:password@`` and any secret-looking query parameter
    (``password``, ``token``, ``secret``, ``key``, ``auth`` ...) removed: it is printed."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    query = urlencode(
        [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not SECRET.search(k)]
    )
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit(parts._replace(netloc=netloc, query=query))


SECRET = re.compile(r"pass|token|secret|key|auth|cred|signature", re.IGNORECASE)


def mlflow_view(tracking_uri: str) -> str:
    """How to look at the store ``tracking_uri``: the URL of a tracking server, else the
    ``mlflow ui`` command that serves this store (a sqlite database, a file store)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {without_credentials(tracking_uri)}"
    if tracking_uri.startswith("databricks"):
        return "open your Databricks workspace's Experiments page"
    uri = tracking_uri if "://" in tracking_uri else Path(tracking_uri).resolve().as_uri()
    return f"mlflow ui --backend-store-uri {shlex.quote(without_credentials(uri))}"


def audit_command(run_ids: Sequence[str], tracking_uri: str, default_uri: str) -> str:
    """``regimen audit`` of one run (or ``--compare`` of several), with ``--tracking-uri``
    unless ``tracking_uri`` is what audit would use by default (``default_uri``)."""
    words = ["regimen", "audit", *(["--compare"] if len(run_ids) > 1 else []), *run_ids]
    if tracking_uri != default_uri:
        words += ["--tracking-uri", without_credentials(tracking_uri)]
    return " ".join(shlex.quote(w) for w in words)


def closing_lines(
    jobs: Sequence[Job], tracking_uri: str, *, default_uri: str, log_file: str | None = None
) -> list[str]:
    """The last lines of ``regimen run`` / ``resume`` / ``rollback``: where to look.

    One job: the MLflow view, its ``regimen audit``, checkpoint, exported model and log
    file. A sweep: the MLflow view, the parent run, ``regimen audit --compare`` of the
    variants, then one line per variant (run id, checkpoint, model). ``log_file`` is the
    capture when no job has a run directory to keep it in."""
    lines = [f"  MLflow      {mlflow_view(tracking_uri)}"]
    started = [j for j in jobs if j.run_id]
    if len(jobs) == 1 and started:
        job = started[0]
        lines.append(f"  audit       {audit_command([job.run_id], tracking_uri, default_uri)}")
        lines += _paths(job, indent="  ")
    elif started:
        parent = next((j.parent_run_id for j in started if j.parent_run_id), None)
        if parent:
            lines.append(f"  sweep       parent run {parent} ({len(jobs)} variants)")
        ids = [j.run_id for j in started]
        lines.append(f"  compare     {audit_command(ids, tracking_uri, default_uri)}")
        width = max(len(j.variant) for j in jobs)
        for j in jobs:
            where = f"checkpoint {j.checkpoint}" if j.checkpoint else "no checkpoint"
            model = f"  model {j.export}" if j.export else ""
            lines.append(
                f"  {j.variant:<{width}}  {j.status:<8} run {j.run_id or '-'}  {where}{model}"
            )
        logs = sorted({log for j in jobs for log in j.logs})
        if logs:
            more = " (a copy in each variant's run directory)" if len(logs) > 1 else ""
            lines.append(f"  logs        {logs[0]}{more}")
    if log_file and not any(j.logs for j in jobs):
        lines.append(f"  logs        {log_file}")
    return lines


def _paths(job: Job, indent: str) -> list[str]:
    lines = []
    if job.checkpoint:
        lines.append(f"{indent}checkpoint  {job.checkpoint}")
    if job.export:
        lines.append(f"{indent}model       {job.export}")
    for log in job.logs:
        lines.append(f"{indent}logs        {log}")
    return lines


__all__ = [
    "CAPTURE_FORMAT",
    "LIBRARY_LOGGERS",
    "MLFLOW_CONFIGURE",
    "Job",
    "LibraryLog",
    "audit_command",
    "closing_lines",
    "mlflow_view",
    "without_credentials",
]
