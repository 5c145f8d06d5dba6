"""`techniques.fault_injection`: which deliberate faults fire at which steps (tests, demos).

The faults themselves are :mod:`orchestrator.techniques.fault_injection`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from orchestrator.recipe.sections import TechniqueConfig

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe


class FaultInjectionConfig(TechniqueConfig):
    """`techniques.fault_injection`: deliberate faults at given steps (tests, demos)."""

    nan_at_step: int | None = Field(None, ge=0)
    spike_at_step: int | None = Field(None, ge=0)
    spike_steps: int = Field(1, ge=1)
    spike_factor: float = Field(100.0, gt=0.0)
    transient_spike_at_step: int | None = Field(
        None, ge=0, description="Loss x spike_factor on that step's first pass only: a re-run "
        "of the step (spike guard replay) does not see it (a transient fault)."
    )  # fmt: skip
    transient_spike_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Only the ranks whose "
        "environment sets this variable (non-empty) see the transient spike: a faulty node "
        "in tests (the variable set on that node's `ray start`)."
    )  # fmt: skip
    poison_samples: tuple[int, int] | None = Field(
        None, description="Stream positions [start, end): the loss of every global batch "
        "holding one is x spike_factor whenever it is drawn (bad data: a spike that reproduces)."
    )  # fmt: skip
    grad_blowup_at_step: int | None = Field(None, ge=0)
    grad_factor: float = Field(1e4, gt=0.0)
    nan_grad_at_step: int | None = Field(None, ge=0, description="NaN gradients, finite loss.")
    nan_grad_rank: int = Field(0, ge=0, description="The one rank whose gradients become NaN.")
    diverge_at_step: int | None = Field(None, ge=0, description="Start of a slow divergence.")
    diverge_steps: int = Field(50, ge=1, description="Steps the loss factor ramps over.")
    diverge_factor: float = Field(3.0, gt=1.0, description="Loss factor at the ramp's end.")
    corrupt_batch_at_step: int | None = Field(
        None, ge=0, description="That step's tokens replaced by uniform random ones."
    )
    kill_at_step: int | None = Field(None, ge=0)
    kill_in_checkpoint_at_step: int | None = Field(None, ge=1)
    kill_rank: int = Field(0, ge=0)
    kill_mode: Literal["exit", "raise"] = "exit"


def describe(cfg: FaultInjectionConfig, recipe: Recipe) -> dict[str, object]:
    """The faults that are set."""
    return cfg.model_dump(exclude_none=True)
