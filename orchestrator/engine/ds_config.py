"""The DeepSpeed config of a job: the recipe's native `deepspeed:` keys under the derived ones.

What Regimen derives, and the checks of the native keys against the rest of the recipe,
live with the recipe (:mod:`orchestrator.recipe.deepspeed`), which validation uses
without the worker side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.recipe.deepspeed import derived_config
from orchestrator.recipe.deepspeed import ds_config_problems as ds_config_problems
from orchestrator.recipe.dotted import deep_merge

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe


def build_ds_config(recipe: Recipe) -> dict[str, Any]:
    """The full DeepSpeed config: native keys deep-merged under the derived ones."""
    return deep_merge(recipe.deepspeed, derived_config(recipe))
