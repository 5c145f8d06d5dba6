"""The technique registry: name -> config model, builder, fixed run order.

Registering is all a technique needs to be part of the recipe schema, of
``regimen schema``/docs, of the training loop and of the conformance test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.techniques.base import Technique, TechniqueConfig

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe


@dataclass(frozen=True)
class TechniqueSpec:
    """How to find, validate and build one technique.

    ``order`` fixes hook order (lower runs first, same on every rank).
    ``section`` is where its config lives: ``techniques`` (``techniques.<name>``)
    or a top-level section such as ``stability``.
    ``check`` returns cross-section problems as ``(dotted_key, message)`` pairs.
    ``describe`` gives what `regimen plan` shows for it (phase boundaries, switches).
    ``example`` is a config that makes the technique act within a few steps of a tiny
    model: the conformance test runs every technique with it.
    """

    name: str
    config: type[TechniqueConfig]
    build: Callable[[TechniqueConfig, Recipe], Technique]
    order: int
    summary: str
    section: str = "techniques"
    check: Callable[[TechniqueConfig, Recipe], list[tuple[str, str]]] | None = None
    describe: Callable[[TechniqueConfig, Recipe], dict[str, Any]] | None = None
    example: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, TechniqueSpec] = {}


def register(spec: TechniqueSpec) -> TechniqueSpec:
    """Add a technique; names are unique."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"technique {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> list[TechniqueSpec]:
    """Every technique, in run order. Importing the catalog fills the registry."""
    import orchestrator.techniques.catalog  # noqa: F401  (side effect: registrations)

    return sorted(_REGISTRY.values(), key=lambda s: (s.order, s.name))


def config_of(spec: TechniqueSpec, recipe: Recipe) -> TechniqueConfig | None:
    """The technique's config in ``recipe``, or None when the recipe does not mention it."""
    if spec.section == "techniques":
        return getattr(recipe.techniques, spec.name, None)
    return getattr(recipe, spec.section, None)


def build_techniques(recipe: Recipe) -> list[Technique]:
    """Instantiate every enabled technique of ``recipe`` in run order."""
    built: list[Technique] = []
    for spec in registered():
        cfg = config_of(spec, recipe)
        if cfg is not None and cfg.enabled:
            built.append(spec.build(cfg, recipe))
    return built


def check_techniques(recipe: Recipe) -> list[tuple[str, str]]:
    """Cross-section problems of every configured technique, as (dotted_key, message)."""
    problems: list[tuple[str, str]] = []
    for spec in registered():
        cfg = config_of(spec, recipe)
        if cfg is not None and cfg.enabled and spec.check is not None:
            problems.extend(spec.check(cfg, recipe))
    return problems
