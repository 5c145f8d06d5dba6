"""`techniques.update_clipping`: StableAdamW-style per-tensor update clipping, config and checks.

The optimizer wrapper is :mod:`orchestrator.techniques.update_clipping`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from orchestrator.recipe.sections import TechniqueConfig

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe


class UpdateClippingConfig(TechniqueConfig):
    """`techniques.update_clipping`: divide a tensor's step size by ``RMS(g^2 / v_hat) /
    max_rms`` when that RMS exceeds ``max_rms`` (Wortsman et al. 2023: ``max_rms = 1``)."""

    max_rms: float = Field(
        1.0,
        gt=0.0,
        description="Clip a tensor's update when RMS(g^2 / v_hat) exceeds this (paper: 1).",
    )


def check(cfg: UpdateClippingConfig, recipe: Recipe) -> list[tuple[str, str]]:
    """An Adam-family optimizer (it has a second moment) and ZeRO 0, 1 or 2."""
    problems = []
    if recipe.optimizer.name not in ("adam", "adamw"):
        problems.append(
            (
                "techniques.update_clipping",
                f"update clipping needs Adam's second moment; optimizer.name is "
                f"{recipe.optimizer.name!r}: use adamw or adam",
            )
        )
    if recipe.zero_stage >= 3:
        problems.append(
            (
                "techniques.update_clipping",
                "ZeRO-3 is not supported: its optimizer steps sub-groups of the parameters' "
                "partitions with no per-tensor map, so the RMS of a tensor cannot be formed; "
                "use ZeRO stage 0, 1 or 2",
            )
        )
    return problems


def describe(cfg: UpdateClippingConfig, recipe: Recipe) -> dict[str, object]:
    """The threshold and the optimizer it clips."""
    return {"max_rms": cfg.max_rms, "optimizer": recipe.optimizer.name}
