"""docs/RECIPES.md is generated from the schema and never drifts from it."""

from __future__ import annotations

import runpy
import warnings
from pathlib import Path

import pytest

from orchestrator.recipe.catalog import CATALOG
from orchestrator.recipe.reference import all_paths, key_problem, render_markdown
from orchestrator.recipe.schema import Recipe

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "RECIPES.md"


def test_recipes_md_is_up_to_date() -> None:
    assert DOC.read_text() == render_markdown(), (
        "docs/RECIPES.md is stale: regenerate it with "
        "`python -m orchestrator.recipe.reference > docs/RECIPES.md`"
    )


def test_header_says_how_to_regenerate() -> None:
    head = render_markdown().splitlines()[:3]
    assert any("python -m orchestrator.recipe.reference > docs/RECIPES.md" in h for h in head)


def test_every_key_of_every_section_is_documented() -> None:
    text = render_markdown()
    sections = {line[5:-1] for line in text.splitlines() if line.startswith("### `")}
    for path in all_paths():
        section, _, key = path.rpartition(".")
        if section:
            assert section in sections, f"no section for {section}"
        assert f"| `{key}` |" in text, f"{path} is not documented"
    for spec in CATALOG:
        where = f"techniques.{spec.name}" if spec.section == "techniques" else spec.section
        assert where in sections, f"technique {spec.name} has no section"
    assert "| `steps` | integer | **required** | > 0 |" in text
    assert "| `lr` | number | `0.001` | > 0.0 |" in text
    assert "one of `adamw`, `adam`, `sgd`" in text


def test_intro_explains_extends_overrides_sweeps_and_errors() -> None:
    text = render_markdown()
    for words in ("extends: base.yaml", "optimizer.lr=3e-4", "sweep.grid", "sweep.zip",
                  "FILE:LINE: dotted.key: what is wrong and how to fix it"):  # fmt: skip
        assert words in text


def test_module_prints_the_markdown(capsys: pytest.CaptureFixture[str]) -> None:
    """What `python -m orchestrator.recipe.reference` prints (run in-process)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the module is already imported here
        runpy.run_module("orchestrator.recipe.reference", run_name="__main__")
    assert capsys.readouterr().out == render_markdown()


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("optimizer.lr", None),
        ("model.config.hidden_size", None),
        ("deepspeed.zero_optimization.stage", None),
        ("optimizer.betas.0", None),
        ("techniques.warmup.min_lr", None),
        ("optimizer.lrr", "did you mean 'optimizer.lr'?"),
        ("optimiser.lr", "did you mean 'optimizer'?"),
        ("techniques.warmpu.min_lr", "did you mean 'techniques.warmup'?"),
        ("optimizer.lr.x", "is a value, not a section"),
        ("zzz", "use one of: name,"),
    ],
)
def test_key_problem(key: str, fragment: str | None) -> None:
    problem = key_problem(key)
    if fragment is None:
        assert problem is None
    else:
        assert problem is not None and fragment in problem


def test_all_paths_cover_the_top_level() -> None:
    assert set(Recipe.model_fields) <= set(all_paths())
