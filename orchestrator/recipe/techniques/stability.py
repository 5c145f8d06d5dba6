"""`stability:`: the spike guard's config (detectors, escalation, leading indicators), checks.

The guard itself is :mod:`orchestrator.techniques.spike_guard`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from orchestrator.recipe.sections import TechniqueConfig

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe


class StabilityConfig(TechniqueConfig):
    """`stability:`: spike detection and the skip -> rollback -> stop escalation."""

    window: int = Field(128, ge=4, description="Rolling window of healthy steps for z-scores.")
    threshold: float = Field(
        6.0, gt=0.0, description="Robust z-score (sigmas) that counts as a spike."
    )
    grad_threshold: float = Field(
        12.0, gt=0.0, description="Robust z-score of the log gradient norm that counts as a "
        "spike (healthy steps reach 9: gradient norms are heavy-tailed; x100 scores ~15)."
    )  # fmt: skip
    grad_scale_floor: float = Field(
        0.25, ge=0.0, description="Least robust sigma of the log gradient norm: with the "
        "threshold 12, a norm must be > e^3 = 20x the median to be a spike however narrow "
        "the window (healthy hard batches reach 10x late in training; x100 scores >= 18)."
    )  # fmt: skip
    trend_threshold: float | None = Field(
        20.0, gt=0.0, description="Slow-divergence detector: one-sided CUSUM of the log loss "
        "(robust sigmas above the pre-trend baseline, less trend_slack a step) that asks for "
        "a rollback; null = off."
    )  # fmt: skip
    trend_slack: float = Field(
        0.5, ge=0.0, description="Sigmas a step the CUSUM forgives (its drift allowance)."
    )
    trend_baseline: int = Field(
        32, ge=2, description="Healthy steps whose median log loss is the trend's baseline "
        "(frozen while the CUSUM is above 0)."
    )  # fmt: skip
    min_history: int = Field(
        20, ge=2, description="Healthy steps seen (since the start, the end of warmup or a "
        "regime change) before z-scores are armed."
    )  # fmt: skip
    detect_nan: bool = True
    loss_zscore: bool = True
    grad_norm_zscore: bool = True
    max_loss_ratio: float | None = Field(
        None, gt=1.0, description="Spike if loss > ratio x median."
    )
    patience: int = Field(
        2, ge=1, description="Consecutive anomalies (each skipped) before rollback."
    )
    good_after: int = Field(2, ge=0, description="Healthy steps a checkpoint needs to be trusted.")
    skip_batches: int = Field(8, ge=0, description="Global batches skipped from the spike onset.")
    lr_scale: float = Field(1.0, gt=0.0, le=1.0, description="LR factor after a rollback.")
    cooldown_steps: int = Field(
        0, ge=0, description="Steps lr_scale lasts after a rollback; 0 = to the end."
    )
    reset_moments: bool = Field(False, description="Zero the optimizer moments on rollback.")
    max_rollbacks: int = Field(3, ge=0, description="Rollbacks before the job fails.")
    replay: Literal["off", "on_rollback", "always"] = Field(
        "on_rollback", description="Re-run an anomalous step on the same batch from the same "
        "weights before acting: reproduces = the data (skip it, roll back), not = a transient "
        "fault (retry the batch, no rollback). on_rollback: only before a rollback; always: "
        "every anomaly."
    )  # fmt: skip
    max_transient: int = Field(
        3, ge=1, description="Non-reproducible anomalies on one rank and host before the job "
        "stops naming it; the driver restarts it without that node where the cluster allows."
    )  # fmt: skip
    indicators_every: int = Field(
        0, ge=0, description="Log leading indicators every N steps (update RMS, TEV, attention "
        "entropy); 0 = off."
    )  # fmt: skip
    update_rms_max: float | None = Field(
        None, gt=0.0, description="Warn if the max per-layer AdamW update RMS exceeds this."
    )
    tev_max: float | None = Field(
        None, gt=0.0, description="Warn if the mean token embedding variability exceeds this."
    )
    attn_entropy_min: float | None = Field(
        None, ge=0.0, description="Warn if the min per-layer attention entropy (nats) drops below."
    )
    indicator_action: Literal["warn", "detect"] = Field(
        "warn", description="warn: event + metric only; detect: also an anomaly (skip/rollback)."
    )
    indicator_lookback: int = Field(
        32, ge=1, description="A warning this many steps before a spike counts as a lead."
    )


def check(cfg: StabilityConfig, recipe: Recipe) -> list[tuple[str, str]]:
    """The window holds the history, and there are checkpoints to roll back to."""
    problems = []
    if cfg.min_history > cfg.window:
        problems.append(
            (
                "stability.min_history",
                f"min_history {cfg.min_history} exceeds window {cfg.window}: lower it",
            )
        )
    if cfg.max_rollbacks and recipe.checkpoint.every == 0:
        problems.append(
            (
                "checkpoint.every",
                "the spike guard rolls back to checkpoints: set checkpoint.every > 0 (e.g. 50)",
            )
        )
    if cfg.indicators_every and recipe.zero_stage >= 3:
        problems.append(
            (
                "stability.indicators_every",
                "the leading indicators read whole embedding rows and each parameter's slice "
                "of the optimizer state, which ZeRO-3 partitions away: set indicators_every: 0 "
                "under ZeRO-3 (the spike detectors, skips and rollbacks work at every stage), "
                "or use deepspeed.zero_optimization.stage 2",
            )
        )
    return problems


def describe(cfg: StabilityConfig, recipe: Recipe) -> dict[str, object]:
    """Every setting of the guard."""
    return cfg.model_dump()
