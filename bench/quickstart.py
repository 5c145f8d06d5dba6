"""The quickstart recipe with a benchmark's changes merged in, loaded and validated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def quickstart_recipe(changes: dict[str, Any]) -> Any:
    """``recipes/quickstart.yaml`` deep-merged with ``changes`` (nested sections), validated."""
    import yaml

    from orchestrator.recipe.dotted import deep_merge
    from orchestrator.recipe.loader import load_recipe_data

    quick = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    return load_recipe_data(deep_merge(quick, changes), "<bench>")
