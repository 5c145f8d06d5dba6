"""`regimen schema` describes recipe files as written: every recipe in recipes/ validates
against the printed JSON Schema (with the `jsonschema` library), `extends` and
`deepspeed: PATH` included, and a misspelt section is still flagged."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from orchestrator.cli import main
from orchestrator.recipe.loader.problems import Problems
from orchestrator.recipe.loader.yaml_source import parse

REPO = Path(__file__).resolve().parents[3]
RECIPES = [
    p
    for p in sorted((REPO / "recipes").glob("*.yaml"))
    + sorted((REPO / "recipes/ci").glob("*.yaml"))
]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    """The schema exactly as `regimen schema` prints it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["schema"])
    return json.loads(out.getvalue())


def _read(path: Path) -> Any:
    """The file as the loader reads it (YAML 1.2 floats such as 3e-3), before `extends`."""
    data, _ = parse(path.read_text(), str(path), Problems(str(path)))
    return data


def test_there_are_recipes_to_check() -> None:
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "tiny.yaml", "hf_style_zero2.yaml"} <= names
    assert any("extends" in _read(p) for p in RECIPES)
    assert any(isinstance(_read(p).get("deepspeed"), str) for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_validates_against_the_printed_schema(
    path: Path, schema: dict[str, Any]
) -> None:
    jsonschema.validate(_read(path), schema)


def test_schema_still_refuses_unknown_sections(schema: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "x", "schedule": {"steps": 1}, "optimiser": {}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "x", "schedule": {"steps": 1}, "extends": 3}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "x", "schedule": {"steps": 1}, "deepspeed": [1]}, schema)
