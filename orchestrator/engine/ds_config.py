"""The DeepSpeed config of a job: the recipe's native `deepspeed:` keys, every `"auto"`
resolved, under the derived ones.

What Regimen derives, how `"auto"` resolves, and the checks of the native keys against
the rest of the recipe live with the recipe (:mod:`orchestrator.recipe.deepspeed`), which
validation and `regimen plan` use without the worker side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.recipe.deepspeed import ds_config_problems as ds_config_problems
from orchestrator.recipe.deepspeed import resolved_config

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe


def build_ds_config(recipe: Recipe) -> dict[str, Any]:
    """The full DeepSpeed config, resolved before the engine is built: see
    :func:`orchestrator.recipe.deepspeed.resolved_config`."""
    return resolved_config(recipe)
