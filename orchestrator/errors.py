"""One error hierarchy for Regimen. Every error a user can cause carries its fix.

The CLI maps ``RegimenError.exit_code`` to the process exit status: 2 for bad
input (recipes, arguments, missing files), 1 for everything else.
"""

from __future__ import annotations

from dataclasses import dataclass


class RegimenError(Exception):
    """Base class of every error Regimen raises on purpose; ``exit_code`` is the CLI status."""

    exit_code = 1


class UsageError(RegimenError):
    """Bad command-line input (unknown run id, bad flag value): exit 2."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe, located by file, line and dotted key."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else f"{self.file}:?"
        key = self.key or "<recipe>"
        return f"{where}: {key}: {self.message}"


class RecipeError(RegimenError):
    """A recipe is invalid. Holds *every* problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class CheckpointError(RegimenError):
    """A checkpoint is missing, partial, or fails its manifest check."""


class TrackingError(RegimenError):
    """MLflow could not be reached or refused an operation that cannot be deferred."""


class RollbackExhausted(RegimenError):
    """The spike guard used up its rollback budget; the message lists steps and actions tried."""


class BadWorker(RollbackExhausted):
    """A technique stopped the job because one rank's hardware looks faulty: anomalies on
    ``rank`` that did not reproduce on replay (the spike guard). ``step``: the loop's step
    when it stopped (as in ``stopped.json``). The driver may restart the job without that
    rank's node (``cluster/workers.py``)."""

    def __init__(self, message: str, rank: int, step: int = -1) -> None:
        super().__init__(message)
        self.rank = rank
        self.step = step

    def __reduce__(self) -> tuple[type[BadWorker], tuple[str, int, int]]:
        # travels from a Ray actor to the driver as itself (Ray pickles the cause)
        return (type(self), (str(self), self.rank, self.step))


class TrainingFailed(RegimenError):
    """A job failed for another reason (e.g. worker crashes past the restart budget)."""


class JobStopped(RegimenError):
    """A job was stopped by the user (Ctrl-C, SIGTERM or `regimen stop`)."""
