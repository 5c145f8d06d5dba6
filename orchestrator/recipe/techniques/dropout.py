"""`techniques.dropout`: the config, the rate schedule (a pure function of the step), checks, plan.

"Dropout Reduces Underfitting" (Liu et al., ICML 2023) updates the rate every optimizer
step. For step ``k`` (0-based, the step about to run), rate ``r`` and cut-off ``C`` steps
(``T`` in all):

* ``standard``: ``r`` throughout (``schedule`` must be ``constant``);
* ``early`` + ``constant``: ``r`` for ``k < C``, then 0;
* ``early`` + ``linear``: ``r * (1 - k / (C - 1))`` for ``k < C`` (the paper's
  ``np.linspace(r, 0, C)``), then 0;
* ``late`` + ``constant``: 0 for ``k < C``, then ``r`` (the paper's late dropout);
* ``late`` + ``linear``: 0 for ``k < C``, then a ramp reaching ``r`` at ``T - 1`` (an
  extension; the paper only defines a constant late phase).

Where the rate goes is :mod:`orchestrator.techniques.dropout`'s business.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from orchestrator.recipe.sections import TechniqueConfig

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe


class DropoutConfig(TechniqueConfig):
    """`techniques.dropout`: mode, schedule, rate, cut-off (`cutoff_steps` or `cutoff_fraction`)."""

    mode: Literal["standard", "early", "late"] = "early"
    schedule: Literal["constant", "linear"] = "constant"
    rate: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout rate of the active phase.")
    drop_path_rate: float | None = Field(
        None, ge=0.0, lt=1.0, description="Stochastic-depth rate; default: `rate`."
    )
    cutoff_steps: int | None = Field(None, ge=0, description="Phase boundary in steps.")
    cutoff_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="Phase boundary as a fraction of schedule.steps."
    )
    target: Literal["dropout", "drop_path", "both"] = "dropout"

    @model_validator(mode="after")
    def _consistent(self) -> DropoutConfig:
        if self.cutoff_steps is not None and self.cutoff_fraction is not None:
            raise ValueError("give cutoff_steps or cutoff_fraction, not both")
        if self.mode == "standard":
            if self.schedule != "constant":
                raise ValueError(
                    "mode 'standard' keeps the rate constant: use schedule 'constant' "
                    "(or mode 'early' with schedule 'linear' for a decreasing rate)"
                )
        elif self.cutoff_steps is None and self.cutoff_fraction is None:
            raise ValueError(
                f"mode '{self.mode}' needs a cut-off: set cutoff_steps or cutoff_fraction"
            )
        return self

    def resolved_cutoff(self, total_steps: int) -> int:
        """The phase boundary in steps (0 for standard)."""
        if self.cutoff_steps is not None:
            return self.cutoff_steps
        return round((self.cutoff_fraction or 0.0) * total_steps)

    @property
    def path_rate(self) -> float:
        """The stochastic-depth rate of the active phase."""
        return self.rate if self.drop_path_rate is None else self.drop_path_rate


def scheduled_rate(cfg: DropoutConfig, peak: float, step: int, total_steps: int) -> float:
    """The rate of optimizer step ``step`` (0-based) for a peak rate ``peak``."""
    if cfg.mode == "standard":
        return peak
    cut = cfg.resolved_cutoff(total_steps)
    if cfg.mode == "early":
        if step >= cut:
            return 0.0
        if cfg.schedule == "constant" or cut <= 1:
            return peak
        return peak * (1.0 - step / (cut - 1))
    if step < cut:
        return 0.0
    if cfg.schedule == "constant":
        return peak
    span = total_steps - 1 - cut
    return peak if span <= 0 else peak * min(1.0, (step - cut) / span)


def check(cfg: DropoutConfig, recipe: Recipe) -> list[tuple[str, str]]:
    """The cut-off falls inside the run."""
    cut, total = cfg.resolved_cutoff(recipe.schedule.steps), recipe.schedule.steps
    if cfg.mode != "standard" and cut > total:
        key = "cutoff_steps" if cfg.cutoff_steps is not None else "cutoff_fraction"
        return [
            (
                f"techniques.dropout.{key}",
                f"cut-off ({cut} steps) is after the end of training (schedule.steps {total}): "
                "lower it or train longer",
            )
        ]
    return []


def describe(cfg: DropoutConfig, recipe: Recipe) -> dict[str, object]:
    """The phase boundary and the rates around it."""
    total = recipe.schedule.steps
    cut = cfg.resolved_cutoff(total) if cfg.mode != "standard" else 0
    marks = {0, total - 1}
    if cfg.mode != "standard":
        marks |= {max(0, cut - 1), cut}
        if cfg.schedule == "linear":
            marks.add(cut // 2 if cfg.mode == "early" else (cut + total - 1) // 2)
    marks &= set(range(total))
    out: dict[str, object] = {"mode": cfg.mode, "schedule": cfg.schedule, "target": cfg.target}
    if cfg.mode != "standard":
        out["cutoff_step"] = cut
    if cfg.target in ("dropout", "both"):
        out["rate_at_step"] = {k: scheduled_rate(cfg, cfg.rate, k, total) for k in sorted(marks)}
    if cfg.target in ("drop_path", "both"):
        out["drop_path_rate_at_step"] = {
            k: scheduled_rate(cfg, cfg.path_rate, k, total) for k in sorted(marks)
        }
    return out
