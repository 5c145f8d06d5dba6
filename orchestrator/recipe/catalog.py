"""The technique catalog: every technique section of a recipe, listed explicitly.

One :class:`TechniqueEntry` per technique: its name, where its config lives
(``techniques.<name>`` or a top-level section such as ``stability``), the config model,
its fixed run order, a summary, its cross-section check, what `regimen plan` shows and
the conformance example. The schema (:mod:`orchestrator.recipe.schema`) builds the
``techniques:`` section from this list, so the schema never depends on what else was
imported before it. Everything here is light (pydantic only); the training side maps
each name to its builder in :mod:`orchestrator.techniques.registry`.

Adding a technique: a light module under ``orchestrator/recipe/techniques/`` (config,
check, describe), an entry below, and a builder in the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from orchestrator.recipe.sections import TechniqueConfig
from orchestrator.recipe.techniques import (
    continual,
    dropout,
    fault_injection,
    lisa,
    sgg,
    stability,
    update_clipping,
    warmup,
)

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe

C = TypeVar("C", bound=TechniqueConfig)
Problems = list[tuple[str, str]]


@dataclass(frozen=True)
class TechniqueEntry(Generic[C]):
    """How to find, validate and describe one technique's config (no torch needed).

    ``order`` fixes hook order (lower runs first, same on every rank).
    ``section`` is where its config lives: ``techniques`` (``techniques.<name>``)
    or a top-level section such as ``stability``.
    ``check`` returns cross-section problems as ``(dotted_key, message)`` pairs.
    ``describe`` gives what `regimen plan` shows for it (phase boundaries, switches).
    ``example`` is a config that makes the technique act within a few steps of a tiny
    model: the conformance test runs every technique with it.
    """

    name: str
    config: type[C]
    order: int
    summary: str
    section: str = "techniques"
    check: Callable[[C, Recipe], Problems] | None = None
    describe: Callable[[C, Recipe], dict[str, Any]] | None = None
    example: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The dotted key of its config section: ``techniques.<name>`` or the section."""
        return f"techniques.{self.name}" if self.section == "techniques" else self.section


FAULT_INJECTION = TechniqueEntry(
    name="fault_injection",
    config=fault_injection.FaultInjectionConfig,
    order=5,
    summary="Deliberate faults (NaN, loss spike, gradient blow-up, worker kill) for tests.",
    describe=fault_injection.describe,
    example={"spike_at_step": 1, "spike_factor": 1.0},
)
WARMUP = TechniqueEntry(
    name="warmup",
    config=warmup.WarmupConfig,
    order=10,
    summary="Linear warmup then linear/cosine/constant/WSD decay of the LR.",
    check=warmup.check,
    describe=warmup.describe,
    example={"schedule": "cosine", "warmup_steps": 2},
)
CONTINUAL = TechniqueEntry(
    name="continual",
    config=continual.ContinualConfig,
    order=15,
    summary="Continual-learning stages, replay buffer and continual evaluation.",
    section="continual",
    check=continual.check,
    describe=continual.describe,
    example={
        "stages": [
            {"name": "first", "steps": 3},
            {
                "name": "second",
                "steps": 3,
                "data": {"kind": "stdlib_bytes", "seq_len": 32, "max_bytes": 120_000},
            },
        ],
        "replay": {"size": 8, "policy": "reservoir", "ratio": 0.5},
        "eval": {"every": 2, "subset_size": 4},
    },
)
DROPOUT = TechniqueEntry(
    name="dropout",
    config=dropout.DropoutConfig,
    order=20,
    summary="Standard / early / late dropout and stochastic depth, set every step.",
    check=dropout.check,
    describe=dropout.describe,
    example={"mode": "early", "schedule": "linear", "rate": 0.2, "cutoff_steps": 4},
)
LISA = TechniqueEntry(
    name="lisa",
    config=lisa.LisaConfig,
    order=30,
    summary="LISA: gamma sampled layers (+ embeddings/head) train per interval; "
    "optimizer state only for them.",
    check=lisa.check,
    describe=lisa.describe,
    example={"gamma": 1, "interval": 2},
)
SGG = TechniqueEntry(
    name="sgg",
    config=sgg.SGGConfig,
    order=60,
    summary="Scaling with Gradient Grouping: per-layer k-means on momentum, per-cluster LR.",
    check=sgg.check,
    describe=sgg.describe,
    example={"recluster_interval": 2, "scale_decay": 0.5},
)
UPDATE_CLIPPING = TechniqueEntry(
    name="update_clipping",
    config=update_clipping.UpdateClippingConfig,
    order=70,
    summary="StableAdamW-style update clipping: a tensor's step size divided by "
    "RMS(g^2 / v) when above 1.",
    check=update_clipping.check,
    describe=update_clipping.describe,
    example={"max_rms": 0.5},
)
SPIKE_GUARD = TechniqueEntry(
    name="spike_guard",
    config=stability.StabilityConfig,
    order=90,
    summary="NaN / robust z-score spike detection; skip, roll back, skip data, cool down.",
    section="stability",
    check=stability.check,
    describe=stability.describe,
    example={"window": 8, "min_history": 3, "threshold": 6.0, "patience": 1, "skip_batches": 2},
)

# Every technique, in run order (order, then name).
CATALOG: tuple[TechniqueEntry[Any], ...] = tuple(
    sorted(
        (FAULT_INJECTION, WARMUP, CONTINUAL, DROPOUT, LISA, SGG, UPDATE_CLIPPING, SPIKE_GUARD),
        key=lambda e: (e.order, e.name),
    )
)


def entry(name: str) -> TechniqueEntry[Any]:
    """The catalog entry called ``name``."""
    for e in CATALOG:
        if e.name == name:
            return e
    raise KeyError(f"no technique {name!r} in the catalog: {[e.name for e in CATALOG]}")


def config_of(e: TechniqueEntry[C], recipe: Recipe) -> C | None:
    """The technique's config in ``recipe``, or None when the recipe does not mention it."""
    if e.section == "techniques":
        return getattr(recipe.techniques, e.name, None)
    return getattr(recipe, e.section, None)


def enabled(recipe: Recipe) -> list[tuple[TechniqueEntry[Any], Any]]:
    """``(entry, config)`` of every technique the recipe turns on, in run order."""
    found = ((e, config_of(e, recipe)) for e in CATALOG)
    return [(e, cfg) for e, cfg in found if cfg is not None and cfg.enabled]


def check_techniques(recipe: Recipe) -> Problems:
    """Cross-section problems of every configured technique, as (dotted_key, message)."""
    problems: Problems = []
    for e, cfg in enabled(recipe):
        if e.check is not None:
            problems.extend(e.check(cfg, recipe))
    return problems
