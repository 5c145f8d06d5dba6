"""Worker side (every rank): MLflow's own system metrics, one node id per rank.

Each rank runs one MLflow ``SystemMetricsMonitor`` for the job's run. It samples CPU,
RAM, disk and network (psutil) and, when ``nvidia-ml-py`` (NVIDIA) or ``pyrsmi`` (AMD) is
installed and a GPU is present, each GPU's utilisation, memory and power, every
``tracking.system_metrics_interval_s`` seconds, and logs them as
``system/<node id>/<metric>`` (``system/rank0-1a2b3c4d/cpu_utilization_percentage``): the
MLflow UI shows them in the run's System metrics tab, one series per rank.

The monitor is MLflow's, with three things MLflow leaves to its caller made certain here:
stopping it joins its thread and logs the samples taken since its last report (a run of a
few seconds still shows its samples); starting or stopping never raises (system metrics
must not fail a job); MLflow's INFO lines (started, stopped, "skip logging GPU metrics" when
no GPU library is installed) stay out of the worker's output unless the user configured
the ``mlflow.system_metrics`` logger.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

logger = logging.getLogger(__name__)

_MLFLOW_LOGGER = "mlflow.system_metrics"


def node_id_of(rank: int, node: str | None = None) -> str:
    """The system-metrics node id of one rank: ``rank<R>``, or ``rank<R>-<node>`` where
    ``node`` names the machine (the launcher passes the short Ray node id)."""
    return f"rank{rank}-{node}" if node else f"rank{rank}"


def _quiet_mlflow_monitor() -> None:
    """MLflow's system-metrics logger at WARNING, unless someone set its level."""
    mlflow_logger = logging.getLogger(_MLFLOW_LOGGER)
    if mlflow_logger.level == logging.NOTSET:
        mlflow_logger.setLevel(logging.WARNING)


class SystemMetrics:
    """One rank's running MLflow system-metrics monitor; :meth:`stop` ends it for good."""

    def __init__(self, monitor: Any, node_id: str):
        self.monitor = monitor
        self.node_id = node_id  # what its metric names carry: system/<node_id>/...

    @classmethod
    def start(
        cls, tracking_uri: str, run_id: str, node_id: str, interval_s: float
    ) -> SystemMetrics | None:
        """Start sampling this machine for ``run_id`` under ``node_id``; None (and one
        warning) if MLflow's monitor cannot run here. MLflow's environment variables
        ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` / ``..._SAMPLES_BEFORE_LOGGING`` override
        the interval as they do in MLflow; ``node_id`` always wins over
        ``MLFLOW_SYSTEM_METRICS_NODE_ID``, which would give every rank the same name."""
        _quiet_mlflow_monitor()
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                run_id,
                sampling_interval=interval_s,
                samples_before_logging=1,
                resume_logging=True,  # a restarted worker continues the run's system steps
                node_id=node_id,
                tracking_uri=tracking_uri,
            )
            monitor.node_id = node_id
            monitor.start()
        except Exception as exc:  # psutil missing, MLflow unreachable: the job runs on
            logger.warning("no MLflow system metrics for this worker: %s", exc)
            return None
        return cls(monitor, node_id)

    def stop(self) -> None:
        """Stop sampling, join the monitor's thread, log what it sampled since its last
        report. Idempotent; never raises.

        The last samples are logged only when the monitor was still running: one that
        ended on its own found the run no longer RUNNING or MLflow unreachable, and
        another call would only wait out the HTTP timeouts at the end of the job."""
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        thread = getattr(monitor, "_process", None)  # MLflow's sampling thread
        running = thread is not None and thread.is_alive()
        with contextlib.suppress(Exception):
            monitor.finish()  # joins its thread (it wakes at once) and flushes its batch
        if not running:
            return
        with contextlib.suppress(Exception):
            pending = monitor.aggregate_metrics()
            if pending:
                monitor.publish_metrics(pending)
                monitor.mlflow_logger.flush()
