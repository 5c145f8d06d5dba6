"""The technique registry: each catalog entry's builder, imported only when techniques are built.

The recipe side of every technique (config, checks, plan, run order) is the explicit
catalog :mod:`orchestrator.recipe.catalog`. This module pairs each catalog entry with
the ``SPEC`` (a :class:`TechniqueSpec`) of its technique module, listed in
:data:`BUILDERS`. Nothing registers itself: the technique modules (and torch) are
imported by :func:`registered` / :func:`build_techniques`, never by loading a recipe.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from orchestrator.recipe.catalog import CATALOG, TechniqueEntry, enabled
from orchestrator.recipe.catalog import config_of as config_of
from orchestrator.techniques.base import Technique, TechniqueConfig

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe

C = TypeVar("C", bound=TechniqueConfig)

# Catalog name -> "module:SPEC" of the technique that the entry's config builds.
BUILDERS: dict[str, str] = {
    "fault_injection": "orchestrator.techniques.fault_injection:SPEC",
    "warmup": "orchestrator.techniques.warmup:SPEC",
    "continual": "orchestrator.techniques.continual.technique:SPEC",
    "dropout": "orchestrator.techniques.dropout:SPEC",
    "lisa": "orchestrator.techniques.lisa:SPEC",
    "sgg": "orchestrator.techniques.sgg:SPEC",
    "update_clipping": "orchestrator.techniques.update_clipping:SPEC",
    "spike_guard": "orchestrator.techniques.spike_guard:SPEC",
}


@dataclass(frozen=True)
class TechniqueSpec(Generic[C]):
    """A catalog entry and the builder of its technique, typed by the entry's config.

    ``build(cfg, recipe)`` gets the entry's own config type, so a technique module
    writes ``SPEC = TechniqueSpec(catalog.WARMUP, build=...)`` and the type checker
    checks the builder against ``WarmupConfig``. The entry's fields (name, order,
    section, example, ...) read through.
    """

    entry: TechniqueEntry[C]
    build: Callable[[C, Recipe], Technique]

    @property
    def name(self) -> str:
        """The technique's name (its catalog entry's)."""
        return self.entry.name

    @property
    def config(self) -> type[C]:
        """The config model."""
        return self.entry.config

    @property
    def order(self) -> int:
        """Run order: lower runs first, the same on every rank."""
        return self.entry.order

    @property
    def section(self) -> str:
        """``techniques`` or the top-level section its config lives in."""
        return self.entry.section

    @property
    def summary(self) -> str:
        """One line on what it does."""
        return self.entry.summary

    @property
    def example(self) -> dict[str, Any]:
        """A config that makes it act within a few steps of a tiny model (conformance)."""
        return self.entry.example


def spec_of(name: str) -> TechniqueSpec[Any]:
    """The spec of the catalog entry ``name``, importing its technique module."""
    target = BUILDERS.get(name)
    if target is None:
        raise LookupError(
            f"technique {name!r} is in orchestrator.recipe.catalog but has no builder: "
            "add it to orchestrator.techniques.registry.BUILDERS"
        )
    module, _, attr = target.partition(":")
    spec = getattr(importlib.import_module(module), attr)
    if not isinstance(spec, TechniqueSpec) or spec.name != name:
        raise LookupError(f"{target} is not the TechniqueSpec of {name!r}")
    return spec


def registered() -> list[TechniqueSpec[Any]]:
    """Every technique's spec, in run order (the catalog's); imports every technique module."""
    unknown = sorted(set(BUILDERS) - {e.name for e in CATALOG})
    if unknown:
        raise LookupError(f"builders without a catalog entry: {unknown}")
    return [spec_of(e.name) for e in CATALOG]


def build_techniques(recipe: Recipe) -> list[Technique]:
    """Instantiate every enabled technique of ``recipe`` in run order."""
    return [spec_of(e.name).build(cfg, recipe) for e, cfg in enabled(recipe)]
