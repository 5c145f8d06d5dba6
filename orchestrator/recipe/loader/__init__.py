"""Load a recipe: safe YAML with a line for every key, `extends`, overrides, and full validation.

Every problem found (YAML, schema, sweeps, DeepSpeed conflicts, technique checks) is
collected and raised together as one :class:`RecipeError`, each as
``FILE:LINE: dotted.key: what is wrong and how to fix it``.

The steps live in their own modules: :mod:`.yaml_source` (bounded, line-mapped safe YAML),
:mod:`.extends`, :mod:`.ds_file` (`deepspeed: PATH`), :mod:`.overrides` and
:mod:`.validate` (schema, sweeps, cross-checks), all reporting into one
:class:`~.problems.Problems`. This module holds the entry points.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.recipe.loader.ds_file import inline_deepspeed_file
from orchestrator.recipe.loader.extends import MAX_EXTENDS_DEPTH, resolve_extends
from orchestrator.recipe.loader.overrides import OVERRIDE_FILE, apply_overrides, parse_override
from orchestrator.recipe.loader.problems import Problems
from orchestrator.recipe.loader.validate import MAX_VARIANTS, validate_data
from orchestrator.recipe.loader.yaml_source import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, parse
from orchestrator.recipe.schema import Recipe

__all__ = [
    "MAX_DEPTH",
    "MAX_EXTENDS_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "MAX_VARIANTS",
    "OVERRIDE_FILE",
    "LoadedRecipe",
    "Problems",
    "dump_recipe",
    "load_recipe",
    "load_recipe_data",
    "load_recipe_text",
    "parse_override",
    "recipe_dict",
    "validate_data",
]

_Problems = Problems  # the collector's former private name


@dataclass
class LoadedRecipe:
    """A validated recipe, the plain dict it came from, and where each key was written."""

    recipe: Recipe
    data: dict[str, Any]
    source: Path
    lines: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def yaml_text(self) -> str:
        """The resolved recipe (extends and overrides applied) as YAML."""
        return dump_recipe(self.recipe)

    @property
    def sha256(self) -> str:
        """Hash of the resolved recipe: identical regimes have identical hashes."""
        return hashlib.sha256(self.yaml_text.encode()).hexdigest()


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data with every default filled in and its ``${env:NAME}``
    references in place of their values (what may be stored, logged or shipped)."""
    from orchestrator.envrefs import restore_refs

    data: dict[str, Any] = restore_refs(recipe.model_dump(mode="json"), recipe.env_refs)
    return data


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML with every default filled in (what actually runs), secrets as
    their ``${env:NAME}`` references."""
    return yaml.safe_dump(recipe_dict(recipe), sort_keys=False)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRecipe:
    """Read, merge, override and validate a recipe; raise RecipeError listing every problem."""
    path = Path(path)
    problems = Problems(str(path))
    roots = (path.parent.resolve(), Path.cwd().resolve())
    data = resolve_extends(path, problems, roots)
    if data is None:
        raise problems.error()
    if not inline_deepspeed_file(data, problems, roots):  # `deepspeed: PATH`
        raise problems.error()
    apply_overrides(data, overrides, problems)
    if not inline_deepspeed_file(data, problems, roots):  # `deepspeed=PATH` overridden
        raise problems.error()
    recipe = validate_data(data, problems)
    if recipe is None:
        raise problems.error()
    return LoadedRecipe(recipe=recipe, data=data, source=path, lines=problems.lines)


def load_recipe_text(text: str, name: str = "<recipe>") -> Recipe:
    """Validate recipe YAML held in memory (e.g. read back from MLflow)."""
    problems = Problems(name)
    if len(text.encode("utf-8", "replace")) > MAX_FILE_BYTES:
        problems.add("", f"recipe is larger than {MAX_FILE_BYTES} bytes: shorten it", name, 1)
        raise problems.error()
    data, problems.lines = parse(text, name, problems)
    recipe = validate_data(data, problems) if data is not None else None
    if recipe is None:
        raise problems.error()
    return recipe


def load_recipe_data(data: dict[str, Any], name: str = "<data>") -> Recipe:
    """Validate a recipe held as a plain dict (tests, benchmarks); RecipeError lists every
    problem, each located at ``name``."""
    problems = Problems(name)
    recipe = validate_data(data, problems)
    if recipe is None:
        raise problems.error()
    return recipe
