"""Expand a recipe's `sweep:` into variants with stable, readable names.

`grid` takes the cross product of its lists; `zip` advances its lists together;
both together give grid x zip. A variant's name is the recipe name plus each
swept key's last part and value, e.g. ``quickstart-lr=0.003-stage=2``.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import Problem, RecipeError
from orchestrator.recipe.dotted import set_dotted
from orchestrator.recipe.loader import LoadedRecipe, _Problems, validate_data
from orchestrator.recipe.schema import Recipe


@dataclass(frozen=True)
class Variant:
    """One concrete job of a recipe: its name, the swept values, and the validated recipe."""

    name: str
    assignments: dict[str, Any]
    recipe: Recipe


def _slug(value: Any) -> str:
    text = format(value, "g") if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text)[:40]


def variant_name(base: str, assignments: dict[str, Any]) -> str:
    """Readable, stable name of a variant (same assignments, same name)."""
    if not assignments:
        return base
    parts = [f"{key.rsplit('.', 1)[-1]}={_slug(value)}" for key, value in assignments.items()]
    return "-".join([base, *parts])


def assignments_of(loaded: LoadedRecipe) -> list[dict[str, Any]]:
    """The dotted-key assignments of every variant, in a stable order."""
    sweep = loaded.recipe.sweep
    if sweep is None:
        return [{}]
    grid_keys = list(sweep.grid)
    grid = [dict(zip(grid_keys, combo)) for combo in itertools.product(*sweep.grid.values())]
    zipped_len = len(next(iter(sweep.zip.values()))) if sweep.zip else 1
    zipped = [{k: v[i] for k, v in sweep.zip.items()} for i in range(zipped_len)]
    return [{**g, **z} for g in grid for z in zipped]


def expand(loaded: LoadedRecipe) -> list[Variant]:
    """Every variant of the recipe, each validated; RecipeError lists every bad one."""
    problems = _Problems(str(loaded.source))
    problems.lines = dict(loaded.lines)
    base = {k: v for k, v in loaded.data.items() if k != "sweep"}
    variants: list[Variant] = []
    for assignments in assignments_of(loaded):
        data = copy.deepcopy(base)
        for key, value in assignments.items():
            set_dotted(data, key, value)
        name = variant_name(loaded.recipe.name, assignments)
        data["name"] = name
        variant_problems = _Problems(str(loaded.source))
        variant_problems.lines = problems.lines
        recipe = validate_data(data, variant_problems)
        for p in variant_problems.items:
            problems.items.append(Problem(p.file, p.line, p.key, f"in variant {name}: {p.message}"))
        if recipe is not None:
            variants.append(Variant(name=name, assignments=assignments, recipe=recipe))
    if len({v.name for v in variants}) != len(variants):
        problems.add("sweep", "two variants get the same name: make the swept values distinct")
    if problems.items:
        raise RecipeError(problems.items)
    return variants
