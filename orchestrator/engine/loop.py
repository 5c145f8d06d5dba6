"""The training loop's public names, where they always were (``engine.loop``).

The loop itself lives in :mod:`orchestrator.engine.trainer` (the Trainer),
:mod:`orchestrator.engine.build` (the DeepSpeed engine, built and released),
:mod:`orchestrator.engine.recovery` (resume, rollback, stop) and
:mod:`orchestrator.engine.reporting` (events, MLflow sink, summary).
"""

from orchestrator.engine.build import Built, initialize_engine, release_engine
from orchestrator.engine.recovery import LoopState
from orchestrator.engine.reporting import read_summary
from orchestrator.engine.trainer import (
    StepHook,
    Trainer,
    WorkerContext,
    train,
)
from orchestrator.rundir import STOPPED as STOPPED_FILE
from orchestrator.rundir import SUMMARY as SUMMARY_FILE

__all__ = [
    "STOPPED_FILE",
    "SUMMARY_FILE",
    "Built",
    "LoopState",
    "StepHook",
    "Trainer",
    "WorkerContext",
    "initialize_engine",
    "read_summary",
    "release_engine",
    "train",
]
