"""The per-step cost of MLflow's system metrics, monitor on and off side by side in one run.

The quickstart's model, data and optimizer (recipes/quickstart.yaml) at world size 1 on CPU,
in this process, tracked in a sqlite MLflow store (rank 0's metric sink writing every step,
as in a real job). The run alternates blocks of ``--block`` steps with this rank's system
metrics monitor (tracking/system.py, MLflow's ``SystemMetricsMonitor``) running, sampling
every ``--interval`` seconds, and stopped: load drift on a shared machine hits both arms
alike. The first ``--settle`` steps of each block (the start or stop itself) are left out.
Reported: the median step time (``step_time_s``, start to start) with and without, their
ratio, and what one sample costs the monitor's thread (collect, the run's status read,
the log call), measured on its own afterwards.

    python bench/system_metrics.py [--blocks 8] [--block 60] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("PYTHONWARNINGS", "ignore")


def _recipe(args: argparse.Namespace, root: Path) -> Any:
    from bench.quickstart import quickstart_recipe

    return quickstart_recipe(
        {
            "schedule": {"steps": args.blocks * 2 * args.block, "eval_every": 0, "log_every": 1},
            "checkpoint": {"every": 0, "storage": str(root / "runs"), "at_end": False},
            "resources": {"workers": 1, "threads_per_worker": 1},
            # the bench starts and stops the monitor itself
            "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "system_metrics": False},
        }
    )


def _sample_ms(system: Any, samples: int = 20) -> float:
    """One monitor cycle on its own: collect, read the run's status, log the aggregate."""
    from mlflow import MlflowClient

    monitor = system.monitor
    started = time.perf_counter()
    for _ in range(samples):
        monitor.collect_metrics()
        MlflowClient(monitor._tracking_uri).get_run(monitor._run_id)  # as its loop does
        monitor.publish_metrics(monitor.aggregate_metrics())
    monitor.mlflow_logger.flush()
    return (time.perf_counter() - started) / samples * 1e3


def main() -> None:
    """Run the measurement and print one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=8, help="pairs of off/on blocks")
    ap.add_argument("--block", type=int, default=60, help="steps per block")
    ap.add_argument("--settle", type=int, default=2, help="steps left out after each switch")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import init_one_process_group
    from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
    from orchestrator.tracking.runs import open_run
    from orchestrator.tracking.system import SystemMetrics

    init_one_process_group("gloo")
    times: dict[str, list[float]] = {"off": [], "on": []}
    load_before = os.getloadavg()

    class Alternate(StepHook):
        """Blocks of off, on, off, on ... steps; the monitor switched between blocks."""

        def __init__(self, uri: str, run_id: str) -> None:
            self.uri, self.run_id = uri, run_id
            self.system: SystemMetrics | None = None

        def before_step(self, trainer: Trainer) -> None:
            step = trainer.state.step
            if step % args.block == 0:
                if self.system is not None:
                    self.system.stop()
                    self.system = None
                elif (step // args.block) % 2 == 1:
                    self.system = SystemMetrics.start(self.uri, self.run_id, "rank0", args.interval)

        def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            step = trainer.state.step - 1  # the step just done, counted from 0
            if step % args.block >= args.settle:
                times["on" if self.system is not None else "off"].append(metrics["step_time_s"])

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe = _recipe(args, root)
        uri = recipe.tracking.uri
        run_id = open_run(uri, "bench-system-metrics", "job")
        hook = Alternate(uri, run_id)
        trainer = Trainer(recipe, WorkerContext(root / "run", tracking_uri=uri, run_id=run_id))
        trainer.step_hooks.append(hook)
        trainer.run()
        if hook.system is not None:
            hook.system.stop()
        probe = SystemMetrics.start(uri, run_id, "probe", 3600.0)
        sample_ms = _sample_ms(probe) if probe is not None else float("nan")
        if probe is not None:
            probe.stop()
        from mlflow import MlflowClient

        logged = MlflowClient(uri).get_metric_history(
            run_id, "system/rank0/cpu_utilization_percentage"
        )
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(
        json.dumps(
            {
                "model": "quickstart (LLaMA 4 x 64, seq 128, micro-batch 8), world 1, CPU",
                "interval_s": args.interval,
                "steps_measured": {k: len(v) for k, v in times.items()},
                "samples_logged": len(logged),
                "median_step_ms_off": round(off * 1e3, 2),
                "median_step_ms_on": round(on * 1e3, 2),
                "ratio_on_off": round(on / off, 4),
                "one_sample_ms": round(sample_ms, 2),
                "sample_share_of_a_core": round(sample_ms / 1e3 / args.interval, 4),
                "load_average": [load_before, os.getloadavg()],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
