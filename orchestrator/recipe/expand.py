"""Expand a recipe's `sweep:` into variants with stable, readable names.

`grid` takes the cross product of its lists; `zip` advances its lists together;
both together give grid x zip (grid outer, zip inner, each in the order written).
A variant's name is the recipe name plus, per swept key, its last part and value,
e.g. ``quickstart-lr_0.003-stage_2``: the characters a recipe name allows. Two
swept keys with the same last part keep more of their path (``optimizer.lr``).
Names longer than the 100 characters a name allows end in a short hash instead.

Every variant is validated as a whole recipe. A problem caused by a swept value
points at that value's line in `sweep:` and names the variants it breaks.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import Problem
from orchestrator.recipe.loader import LoadedRecipe, Problems, validate_data
from orchestrator.recipe.schema import Recipe

MAX_NAME = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class Variant:
    """One concrete job of a recipe: its name, the swept values, and the validated recipe."""

    name: str
    assignments: dict[str, Any]
    recipe: Recipe


def _digest(text: str, n: int = 6) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _slug(value: Any) -> str:
    """A value as name characters; distinct values that would print alike get a hash."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        return repr(value)  # shortest round-trip form: 0.003, 1e-05
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        text = "_".join(_slug(v) for v in value)
    elif isinstance(value, dict):
        text = "_".join(f"{k}.{_slug(v)}" for k, v in value.items())
    else:
        text = str(value)
    clean = _UNSAFE.sub("_", text).strip("_") or "_"
    if clean != text or len(clean) > 24:
        clean = f"{clean[:24]}.{_digest(repr(value))}"
    return clean


@functools.lru_cache(maxsize=64)
def _labels(keys: tuple[str, ...]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other swept key shares."""
    labels = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if not any(o != key and (o == label or o.endswith("." + label)) for o in keys):
                break
        labels[key] = label
    return labels


def variant_name(base: str, assignments: dict[str, Any]) -> str:
    """Readable, stable name of a variant (same assignments, same name)."""
    if not assignments:
        return base
    labels = _labels(tuple(assignments))
    parts = [f"{labels[key]}_{_slug(value)}" for key, value in assignments.items()]
    name = "-".join([base, *parts])
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 9]}-{_digest(name, 8)}"
    return name


def _combos(loaded: LoadedRecipe) -> list[dict[str, tuple[str, int]]]:
    """Per variant: swept key -> (its sweep section, index of its value), in a stable order."""
    sweep = loaded.recipe.sweep
    if sweep is None or not (sweep.grid or sweep.zip):
        return [{}]
    grid_keys = list(sweep.grid)
    grid = itertools.product(*(range(len(v)) for v in sweep.grid.values()))
    zipped_len = len(next(iter(sweep.zip.values()))) if sweep.zip else 1
    combos = []
    for indices in grid:
        fixed = {k: ("grid", i) for k, i in zip(grid_keys, indices, strict=True)}
        for j in range(zipped_len):
            combos.append({**fixed, **{k: ("zip", j) for k in sweep.zip}})
    return combos


def _value(loaded: LoadedRecipe, key: str, where: tuple[str, int]) -> Any:
    sweep = loaded.recipe.sweep
    if sweep is None:  # only called for keys that come from the sweep section
        raise RuntimeError(f"sweep key {key} looked up in a recipe without a sweep")
    return getattr(sweep, where[0])[key][where[1]]


def assignments_of(loaded: LoadedRecipe) -> list[dict[str, Any]]:
    """The dotted-key assignments of every variant, in a stable order."""
    return [{k: _value(loaded, k, w) for k, w in combo.items()} for combo in _combos(loaded)]


def _with(tree: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``tree`` with ``dotted`` set, copying only the mappings on the way."""
    head, _, rest = dotted.partition(".")
    out = dict(tree)
    if not rest:
        out[head] = value
    else:
        child = tree.get(head)
        out[head] = _with(child if isinstance(child, dict) else {}, rest, value)
    return out


def _related(problem_key: str, swept: str) -> bool:
    """Whether a problem at ``problem_key`` concerns the swept key (or its section)."""
    return (
        problem_key == swept
        or problem_key.startswith(swept + ".")
        or swept.startswith(problem_key + ".")
    )


def _names(names: list[str], total: int) -> str:
    if total > 1 and len(names) == total:
        return f"in every variant ({total})"
    if len(names) == 1:
        return f"in variant {names[0]}"
    shown = ", ".join(names[:3])
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"in variants {shown}{more}"


def expand(loaded: LoadedRecipe) -> list[Variant]:
    """Every variant of the recipe, each validated; RecipeError lists every bad one."""
    combos = _combos(loaded)
    if combos == [{}]:
        return [Variant(name=loaded.recipe.name, assignments={}, recipe=loaded.recipe)]
    file = str(loaded.source)
    base = {k: v for k, v in loaded.data.items() if k != "sweep"}
    found: dict[Problem, list[str]] = {}
    variants: list[Variant] = []
    for combo in combos:
        assignments = {k: _value(loaded, k, w) for k, w in combo.items()}
        name = variant_name(loaded.recipe.name, assignments)
        data = {**base, "name": name}
        for key, value in assignments.items():
            data = _with(data, key, value)
        problems = Problems(file)
        problems.lines = loaded.lines
        recipe = validate_data(data, problems, scan=assignments)
        for p in problems.items:
            culprits = [k for k in combo if _related(p.key, k)]
            if len(culprits) == 1:  # point at the swept value that broke it
                section, index = combo[culprits[0]]
                here = f"sweep.{section}.{culprits[0]}"
                file_, line = loaded.lines.get(
                    f"{here}.{index}", loaded.lines.get(here, (file, None))
                )
                p = Problem(file_, line, p.key, p.message)
            found.setdefault(p, []).append(name)
        if recipe is not None:
            variants.append(Variant(name=name, assignments=assignments, recipe=recipe))
    report = Problems(file)
    report.lines = loaded.lines
    for p, names in found.items():
        report.add(p.key, f"{_names(names, len(combos))}: {p.message}", p.file, p.line)
    seen: dict[str, int] = {}
    for v in variants:
        seen[v.name] = seen.get(v.name, 0) + 1
    for name, n in seen.items():
        if n > 1:
            report.add(
                "sweep",
                f"{n} variants are all named {name}: their swept values print the same; "
                "make the values distinct (e.g. 1 and '1')",
            )
    if report.items:
        raise report.error()
    return variants
