"""Validation of a plain recipe dict, with every problem mapped to its key and line.

Checks the sweep lists key by key, refuses inf/nan, validates against the schema (pydantic
errors become one problem each, worded with their fix and a did-you-mean by
:mod:`orchestrator.recipe.reference`), then runs the DeepSpeed and technique cross-checks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from typing import Any

from pydantic import ValidationError

from orchestrator.recipe.loader.problems import Problems
from orchestrator.recipe.loader.yaml_source import MAX_NODES
from orchestrator.recipe.schema import Recipe

MAX_VARIANTS = 10_000


def _non_finite(data: Any, path: str, out: list[str], budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        return
    if isinstance(data, float) and not math.isfinite(data):
        out.append(path)
    elif isinstance(data, dict):
        for k, v in data.items():
            _non_finite(v, f"{path}.{k}" if path else str(k), out, budget)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _non_finite(v, f"{path}.{i}", out, budget)


def _sweep_problems(data: dict[str, Any], problems: Problems) -> bool:
    """Check the sweep lists (keys, emptiness, zip lengths) one key at a time."""
    from orchestrator.recipe.reference import key_problem

    sweep = data.get("sweep")
    if not isinstance(sweep, dict):
        return False
    found = False
    lengths: dict[str, int] = {}
    for section in ("grid", "zip"):
        lists = sweep.get(section)
        if not isinstance(lists, dict):
            continue
        for key, values in lists.items():
            where = f"sweep.{section}.{key}"
            why = None
            if not isinstance(key, str):
                why = f"key {key!r} must be a dotted recipe key such as optimizer.lr"
            elif key == "name" or key.split(".")[0] == "sweep":
                why = f"'{key}' cannot be swept (variant names come from the sweep): remove it"
            elif (problem := key_problem(key)) is not None:
                why = problem
            elif isinstance(values, list) and not values:
                why = f"the list for '{key}' is empty: give at least one value, or remove the key"
            elif section == "zip" and isinstance(values, list):
                lengths[key] = len(values)
            if section == "zip" and isinstance(sweep.get("grid"), dict) and key in sweep["grid"]:
                why = f"'{key}' is in both grid and zip: keep it in one of them"
            if why:
                problems.add(where, why)
                found = True
    grid = sweep.get("grid")
    sizes = [len(v) for v in grid.values() if isinstance(v, list)] if isinstance(grid, dict) else []
    count = math.prod(sizes)
    count *= max(lengths.values(), default=1)
    if count > MAX_VARIANTS:
        problems.add(
            "sweep",
            f"gives {count} variants; the limit is {MAX_VARIANTS}: use fewer values or "
            "split the sweep into several recipes",
        )
        found = True
    if len(set(lengths.values())) > 1:
        first, n = next(iter(lengths.items()))
        for key, m in lengths.items():
            if m != n:
                problems.add(
                    f"sweep.zip.{key}",
                    f"has {m} values but sweep.zip.{first} has {n}: give every zip list "
                    "the same length",
                )
        found = True
    return found


def _without(data: dict[str, Any], locs: list[tuple[Any, ...]]) -> dict[str, Any]:
    """A copy of ``data`` with the keys at ``locs`` removed."""
    trimmed = copy.deepcopy(data)
    for loc in locs:
        node: Any = trimmed
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return trimmed


def _cross_checks(recipe: Recipe, problems: Problems) -> None:
    from orchestrator.recipe.catalog import check_techniques
    from orchestrator.recipe.deepspeed import ds_config_problems
    from orchestrator.recipe.hf_models import model_problems

    for check in (model_problems, ds_config_problems, check_techniques):
        try:
            found = check(recipe)
        except Exception as exc:
            problems.add(
                "",
                f"check {check.__name__} failed ({type(exc).__name__}: {exc}): this is a "
                "Regimen bug; please report it with this recipe",
            )
            continue
        for key, message in found:
            problems.add(key, message)


def validate_data(
    data: dict[str, Any], problems: Problems, *, scan: dict[str, Any] | None = None
) -> Recipe | None:
    """Validate a plain dict into a Recipe, adding every problem found to ``problems``.

    ``${env:NAME}`` references are resolved from the environment first (an unset variable
    is a problem at its key); the Recipe remembers them for :func:`dump_recipe`.
    ``scan`` limits the inf/nan scan to those dotted keys (a sweep variant: the rest of
    the recipe was scanned when it was loaded); by default the whole recipe is scanned.
    """
    from orchestrator.envrefs import resolve_pinned
    from orchestrator.recipe.reference import explain, key_of

    data, refs = resolve_pinned(data, problems.add)  # ${env:NAME}: values from this process
    swept = _sweep_problems(data, problems)
    bad_floats: list[str] = []
    for prefix, tree in ({"": data} if scan is None else scan).items():
        try:  # fast path in C; walk only when some float is inf/nan
            json.dumps(tree, allow_nan=False, skipkeys=True, default=str)
        except ValueError:
            _non_finite(tree, prefix, bad_floats, [MAX_NODES])
    for key in bad_floats:
        problems.add(key, "is not a finite number (inf/nan): give a plain number")
    reported = set(bad_floats)
    try:
        recipe: Recipe | None = Recipe.model_validate(data)
    except ValidationError as exc:
        recipe = None
        errors: list[dict[str, Any]] = [dict(e) for e in exc.errors()]
        for error in errors:
            loc: tuple[Any, ...] = tuple(error["loc"])
            if error["type"] == "missing" and loc and isinstance(loc[-1], int):
                loc = loc[:-1]  # a short tuple: say so at the tuple, not at the absent item
                error = {**error, "type": "too_short_tuple", "loc": loc}
            if swept and loc == ("sweep",) and error["type"] == "value_error":
                continue  # already said per key by _sweep_problems
            if key_of(loc) in reported:
                continue  # inf/nan, already said
            problems.add(key_of(loc), explain(error))
        if all(e["type"] in ("extra_forbidden", "invalid_key") for e in errors):
            # Unknown keys change nothing else: check the rest as if they were removed.
            trimmed = _without(data, [tuple(e["loc"]) for e in errors])
            with contextlib.suppress(ValidationError):
                _cross_checks(Recipe.model_validate(trimmed), problems)
    if recipe is not None:
        _cross_checks(recipe, problems)
    return None if problems.items or recipe is None else recipe.with_env_refs(refs)
