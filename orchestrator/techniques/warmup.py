"""LR warmup and decay: linear warmup, then linear / cosine / constant / WSD decay.

Regimen computes the LR itself each optimizer step and writes it into the
optimizer's param groups; DeepSpeed's own WarmupLR (a *log* ramp by default) is
not used. The LR is a pure function of the step, so resume needs no state.

For step ``k`` (0-based, the step about to run), peak ``P``, floor ``m``,
``W`` warmup steps and ``T`` total steps:

* warmup (k < W): ``P * (k + 1) / W``
* after warmup, with progress ``p = (k - W) / max(1, T - W)``:
  ``linear``: ``m + (P - m) * (1 - p)``; ``cosine``: ``m + (P - m) * (1 + cos(pi p)) / 2``;
  ``constant``: ``P``; ``wsd``: ``P`` until the last ``decay_fraction * T`` steps,
  then linear to ``m``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, cast

from pydantic import Field, model_validator

from orchestrator.techniques.base import Technique, TechniqueConfig, TrainState
from orchestrator.techniques.registry import TechniqueSpec, register

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe


class WarmupConfig(TechniqueConfig):
    """`techniques.warmup`: give either `warmup_steps` or `warmup_fraction` (of schedule.steps)."""

    schedule: Literal["linear", "cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_fraction: float | None = Field(None, ge=0.0, lt=1.0)
    min_lr: float = Field(0.0, ge=0.0, description="LR floor reached at the end of decay.")
    decay_fraction: float = Field(0.1, gt=0.0, le=1.0, description="WSD only: share of decay.")

    @model_validator(mode="after")
    def _one_warmup(self) -> WarmupConfig:
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            raise ValueError("give warmup_steps or warmup_fraction, not both")
        return self

    def resolved_warmup(self, total_steps: int) -> int:
        """Warmup length in steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round((self.warmup_fraction or 0.0) * total_steps)


def scheduled_lr(cfg: WarmupConfig, peak: float, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) under ``cfg``."""
    warm = cfg.resolved_warmup(total_steps)
    if step < warm:
        return peak * (step + 1) / warm
    floor = min(cfg.min_lr, peak)
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_start = max(warm, total_steps - round(cfg.decay_fraction * total_steps))
        if step < decay_start:
            return peak
        p = (step - decay_start) / max(1, total_steps - decay_start)
        return floor + (peak - floor) * (1.0 - p)
    p = min(1.0, (step - warm) / max(1, total_steps - warm))
    if cfg.schedule == "linear":
        return floor + (peak - floor) * (1.0 - p)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


class Warmup(Technique):
    """Sets the scheduled LR (``state.set_lr``) at the start of every optimizer step."""

    name = "warmup"

    def __init__(self, cfg: WarmupConfig, peak_lr: float):
        self.cfg = cfg
        self.peak_lr = peak_lr

    def on_step_begin(self, state: TrainState) -> None:
        state.set_lr(scheduled_lr(self.cfg, self.peak_lr, state.step, state.total_steps))


def _check(cfg: TechniqueConfig, recipe: Recipe) -> list[tuple[str, str]]:
    cfg = cast(WarmupConfig, cfg)
    warm = cfg.resolved_warmup(recipe.schedule.steps)
    problems = []
    if warm >= recipe.schedule.steps:
        problems.append(
            (
                "techniques.warmup.warmup_steps",
                f"warmup ({warm} steps) must be shorter than schedule.steps "
                f"({recipe.schedule.steps}): lower it or train longer",
            )
        )
    if cfg.min_lr > recipe.optimizer.lr:
        problems.append(
            (
                "techniques.warmup.min_lr",
                f"min_lr {cfg.min_lr} is above optimizer.lr {recipe.optimizer.lr}: "
                "set it below the peak LR",
            )
        )
    return problems


def _describe(cfg: TechniqueConfig, recipe: Recipe) -> dict[str, object]:
    cfg = cast(WarmupConfig, cfg)
    total, peak = recipe.schedule.steps, recipe.optimizer.lr
    warm = cfg.resolved_warmup(total)
    marks = sorted({0, max(0, warm - 1), warm, (warm + total) // 2, total - 1} & set(range(total)))
    return {
        "schedule": cfg.schedule,
        "warmup_steps": warm,
        "lr_at_step": {k: scheduled_lr(cfg, peak, k, total) for k in marks},
    }


register(
    TechniqueSpec(
        name="warmup",
        config=WarmupConfig,
        build=lambda cfg, recipe: Warmup(cfg, recipe.optimizer.lr),  # type: ignore[arg-type]
        order=10,
        summary="Linear warmup then linear/cosine/constant/WSD decay of the LR.",
        check=_check,
        describe=_describe,
        example={"schedule": "cosine", "warmup_steps": 2},
    )
)
