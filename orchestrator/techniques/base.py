"""The technique interface: one small set of hooks, run in a fixed order on every rank.

A technique is a class implementing these hooks, built from its config (a
``TechniqueConfig`` listed in :mod:`orchestrator.recipe.catalog`) by its module's ``SPEC``
(:mod:`orchestrator.techniques.registry`). Hooks default to no-ops; techniques never
inherit from one another.

Hook order inside one optimizer step::

    on_step_begin -> (forward/backward per micro-batch) -> on_before_optimizer_step
      -> [verdict all-reduced] -> optimizer step or skip -> on_step_end -> [verdict all-reduced]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from orchestrator.recipe.sections import TechniqueConfig as TechniqueConfig

if TYPE_CHECKING:
    import torch

    from orchestrator.recipe.schema import Recipe


class Verdict(IntEnum):
    """What a technique asks the loop to do. The loop takes the max over techniques and ranks."""

    PROCEED = 0
    SKIP_STEP = 1
    ROLLBACK = 2
    STOP = 3


@dataclass
class Setup:
    """What a technique may change before ``deepspeed.initialize``.

    ``param_groups`` are handed to the optimizer as-is: a technique may split
    them (one group per layer), drop frozen parameters, or add keys such as
    ``lr_multiplier`` (the loop multiplies the scheduled LR by it).
    ``ds_config`` is the DeepSpeed config about to be used.
    """

    recipe: Recipe
    model: torch.nn.Module
    param_groups: list[dict[str, Any]]
    ds_config: dict[str, Any]
    rank: int
    world_size: int
    wrap_optimizer: list[Callable[[Any], Any]] = field(default_factory=list)


@dataclass
class TrainState:
    """The loop's state as techniques see it. ``step`` counts optimizer steps completed.

    ``lr`` is the scheduled learning rate for the step about to run; the loop
    applies ``lr * lr_scale * group['lr_multiplier']`` to each param group.
    ``metrics`` collects per-step values that the loop logs. ``emit`` records
    an event (rollback, switch, ...) in the run's event log. ``request_rebuild``
    asks the loop to rebuild the DeepSpeed engine before the next step with
    fresh param groups (``configure`` runs again): LISA uses it.
    """

    recipe: Recipe
    total_steps: int
    rank: int
    world_size: int
    step: int = 0
    lr: float = 0.0
    lr_scale: float = 1.0
    loss: float = float("nan")
    grad_norm: float = float("nan")
    model: torch.nn.Module | None = None
    engine: Any = None
    metrics: dict[str, float] = field(default_factory=dict)
    emit: Callable[..., None] = lambda kind, **payload: None
    request_rebuild: bool = False
    rollback_to: int | None = None
    stop_reason: str | None = None
    # Rollback requests (spike guard): stream ranges [start, end) to skip after the restore,
    # whether to reset optimizer moments, and why (lineage). ``cursor`` is the stream position
    # of the current step's first sample; ``run_dir`` is the job's storage directory.
    skip_request: list[tuple[int, int]] = field(default_factory=list)
    reset_moments: bool = False
    rollback_reason: dict[str, Any] = field(default_factory=dict)
    cursor: int = 0
    run_dir: str | None = None
    # Set (for one step) by a technique that changes the data distribution on purpose, e.g. a
    # continual-learning stage switch: detectors restart their statistics instead of taking
    # the expected jump in loss for a spike.
    regime_change: bool = False


class Technique:
    """No-op defaults for every hook; a technique overrides only what it needs."""

    name: str = "technique"

    def configure(self, setup: Setup) -> None:
        """Before ``deepspeed.initialize`` (and again on every engine rebuild)."""

    def on_train_start(self, state: TrainState) -> None:
        """Once the engine exists, before the first step (also after a resume)."""

    def on_step_begin(self, state: TrainState) -> None:
        """Before the first micro-batch of a step: set LR, rates, active layers."""

    def on_before_optimizer_step(self, state: TrainState) -> Verdict:
        """After backward of the last micro-batch, before the optimizer updates."""
        return Verdict.PROCEED

    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> Verdict:
        """After the optimizer step (or its skip); may ask for a rollback or stop."""
        return Verdict.PROCEED

    def on_rollback(self, state: TrainState, step: int) -> None:
        """After the loop restored the checkpoint of ``step`` in place."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last step."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly as an uninterrupted run would."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
