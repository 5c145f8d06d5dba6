"""`techniques.sgg`: the config of Scaling with Gradient Grouping, its checks and plan.

The optimizer wrapper is :mod:`orchestrator.techniques.sgg`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from orchestrator.recipe.sections import TechniqueConfig

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe


class SGGConfig(TechniqueConfig):
    """`techniques.sgg`: cluster each layer's momentum into K groups and scale each group's LR."""

    clusters: int = Field(3, ge=2, le=256, description="K, clusters per layer (paper: 3).")
    recluster_interval: int = Field(
        500, ge=1, description="T, optimizer steps between reclusters (paper: 500)."
    )
    scale_decay: float = Field(
        0.99, ge=0.0, lt=1.0, description="beta3, EMA decay of the scale factors (paper: 0.99)."
    )
    centroid_decay: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="gamma, forgetting of k-means counts; 1 = sklearn MiniBatchKMeans.",
    )
    kmeans_iters: int = Field(
        1, ge=1, le=50, description="Mini-batch k-means passes per recluster."
    )
    scale_min: float = Field(0.1, gt=0.0, description="Lower clamp of a scale factor (paper: 0.1).")
    scale_max: float = Field(10.0, gt=0.0, description="Upper clamp of a scale factor (paper: 10).")
    eps: float = Field(1e-8, gt=0.0, description="Added to D[l, k] in the ratio D* / D[l, k].")
    min_ndim: int = Field(2, ge=1, description="Parameters with fewer dimensions are not scaled.")
    cache_scale_map: bool = Field(
        True,
        description="Keep a per-element fp32 factor between reclusters (faster; +4 bytes/element).",
    )

    @model_validator(mode="after")
    def _clamp_order(self) -> SGGConfig:
        if self.scale_min > self.scale_max:
            raise ValueError(
                f"scale_min {self.scale_min} is above scale_max {self.scale_max}: swap them"
            )
        return self


def check(cfg: SGGConfig, recipe: Recipe) -> list[tuple[str, str]]:
    """SGG reclusters at least once during the run."""
    problems = []
    if cfg.recluster_interval > recipe.schedule.steps:
        problems.append(
            (
                "techniques.sgg.recluster_interval",
                f"{cfg.recluster_interval} is longer than schedule.steps "
                f"({recipe.schedule.steps}): "
                "SGG would never recluster; lower it (the paper used about 5% of the run)",
            )
        )
    return problems


def describe(cfg: SGGConfig, recipe: Recipe) -> dict[str, object]:
    """Clusters, recluster steps, the factors' decay and clamp."""
    t = cfg.recluster_interval
    return {
        "clusters": cfg.clusters,
        "recluster_steps": list(range(t, recipe.schedule.steps + 1, t))[:20],
        "scale_decay": cfg.scale_decay,
        "clamp": [cfg.scale_min, cfg.scale_max],
    }
