"""Property: whatever the recipe file holds, loading it gives a recipe or a RecipeError.

Recipes are built from valid building blocks, then mutated: keys deleted, values
replaced by random scalars and containers, unknown keys injected, `extends` pointed
at odd places, the YAML text itself damaged, random overrides added. `load_recipe`
(and, for valid ones, `expand` and `plan_of`) must never raise anything else, and
every problem must be one well-formed line.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.errors import RecipeError
from orchestrator.recipe.expand import expand
from orchestrator.recipe.loader import load_recipe
from orchestrator.recipe.plan import plan_of

DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
LINE = re.compile(r"^.+:(\d+|\?): [\w.\-<>]*: .+$")

VALID: dict[str, Any] = {
    "name": "prop",
    "seed": 0,
    "precision": "fp32",
    "model": {
        "kind": "hf_config",
        "architecture": "llama",
        "config": {"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 256},
    },
    "data": {"kind": "stdlib_bytes", "seq_len": 32, "max_bytes": 100000},
    "optimizer": {"name": "adamw", "lr": 0.003, "betas": [0.9, 0.95], "grad_clip": 1.0},
    "schedule": {"steps": 20, "micro_batch_size": 4, "eval_every": 10},
    "checkpoint": {"every": 10, "keep": 2},
    "techniques": {"warmup": {"schedule": "cosine", "warmup_steps": 2, "min_lr": 0.0003}},
    "stability": {"window": 16, "threshold": 6.0},
    "deepspeed": {"zero_optimization": {"stage": 1}},
    "resources": {"workers": 1, "cpus_per_worker": 1.0},
    "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "prop", "tags": {"team": "x"}},
    "sweep": {"grid": {"seed": [0, 1]}, "zip": {"optimizer.lr": [0.001, 0.002]}},
}

TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x2FFF), max_size=12
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
    st.sampled_from(["adamw", "cosine", "hf_config", "3e-3", "1e400", "yes", "~", "2024-01-01"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=8,
)
KEYS = st.one_of(TEXT, st.sampled_from(["lr", "steps", "stage", "warmup", "extends", "<<"]))
JUNK = st.sampled_from(
    [":", "-", "[", "]", "{", "}", "&a", "*a", "!!python/name:os.system", "\t", "'", '"',
     "\n", "\x00", "#", "%", "@", "`", "|", ">", "  ", "\n  ", "---\n", "? ", "!!float ",
     "!!int ", "!!bool ", "!!timestamp ", "!!binary ", "!!set ", "<<: ", "<<: *a\n", "&a "]
)  # fmt: skip
EXTENDS = st.sampled_from(
    ["base.yaml", "missing.yaml", "../outside.yaml", "recipe.yaml", "", "/etc/hostname", "."]
)


def paths_of(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (tuple of keys/indices) inside ``tree``."""
    out = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.append((*prefix, k))
            out.extend(paths_of(v, (*prefix, k)))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.append((*prefix, i))
            out.extend(paths_of(v, (*prefix, i)))
    return out


def parent_of(tree: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        tree = tree[part]
    return tree


@st.composite
def recipe_texts(draw: st.DrawFn) -> str:
    tree = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        paths = paths_of(tree)
        action = draw(st.sampled_from(["delete", "retype", "inject", "extends"]))
        if action == "extends":
            tree["extends"] = draw(EXTENDS)
            continue
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = parent_of(tree, path)
        if action == "delete":
            del parent[path[-1]]
        elif action == "retype":
            parent[path[-1]] = draw(VALUES)
        else:
            node = parent[path[-1]]
            target = node if isinstance(node, dict) else parent
            if isinstance(target, dict):
                target[draw(KEYS)] = draw(VALUES)
    text = yaml.dump(tree, Dumper=DUMPER, sort_keys=False, allow_unicode=True)
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        at = draw(st.integers(min_value=0, max_value=len(text)))
        if draw(st.booleans()):
            text = text[:at] + draw(JUNK) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(min_value=1, max_value=8)) :]
    return text


def check_problems(error: RecipeError) -> None:
    assert error.problems
    for problem in error.problems:
        line = str(problem)
        assert "\n" not in line and LINE.match(line), line
        assert "Regimen bug" not in line, line


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("props")
    (work / "base.yaml").write_text(yaml.safe_dump(VALID))
    return work


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    text=recipe_texts(),
    overrides=st.lists(
        st.one_of(
            TEXT,
            st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
                ["optimizer.lr", "schedule.steps", "seed", "sweep.grid.seed", "model.config.x",
                 "techniques.warmup.min_lr", "deepspeed.zero_optimization.stage", "a..b"]
            ), TEXT),
        ),
        max_size=3,
    ),
)  # fmt: skip
def test_load_recipe_only_raises_recipe_error(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, text: str, overrides: list[str]
) -> None:
    monkeypatch.chdir(workdir)
    path = workdir / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        loaded = load_recipe(path, overrides)
    except RecipeError as error:
        check_problems(error)
        return
    try:
        variants = expand(loaded)
    except RecipeError as error:
        check_problems(error)
        return
    for variant in variants:
        if variant.recipe.schedule.steps <= 100_000:
            plan_of(variant)
