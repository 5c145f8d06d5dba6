"""Derive the DeepSpeed config from a recipe and merge the recipe's native `deepspeed:` keys.

Regimen owns batch sizes, clipping, precision, optimizer and scheduler (it sets the
LR itself every step). A native key that contradicts what the recipe says
elsewhere is an error with the fix, never a silent override.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.recipe.dotted import deep_merge

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe

SUPPORTED_ZERO_STAGES = (0, 1, 2)
_OWNED_BLOCKS = {
    "optimizer": "set the optimizer in the recipe's `optimizer:` section",
    "scheduler": "set the LR schedule with `techniques.warmup`",
}


def derived_config(recipe: Recipe) -> dict[str, Any]:
    """The keys Regimen derives from the recipe's schedule, optimizer and precision."""
    s = recipe.schedule
    return {
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": s.grad_accumulation,
        "train_batch_size": recipe.global_batch_size,
        "gradient_clipping": recipe.optimizer.grad_clip,
        "bf16": {"enabled": recipe.precision == "bf16"},
        "fp16": {"enabled": recipe.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _conflicts(derived: Any, native: Any, path: str, out: list[tuple[str, str]]) -> None:
    if isinstance(derived, dict) and isinstance(native, dict):
        for key, value in native.items():
            if key in derived:
                _conflicts(derived[key], value, f"{path}.{key}", out)
    elif derived != native:
        out.append(
            (
                path,
                f"is {native!r} here but the recipe implies {derived!r}: remove it from "
                "`deepspeed:` and set it through schedule/optimizer/precision instead",
            )
        )


def ds_config_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """Conflicts between the native `deepspeed:` keys and what Regimen derives."""
    problems: list[tuple[str, str]] = []
    native = recipe.deepspeed
    for block, fix in _OWNED_BLOCKS.items():
        if block in native:
            problems.append((f"deepspeed.{block}", f"Regimen owns this block: {fix}"))
    _conflicts(derived_config(recipe), native, "deepspeed", problems)
    zero = native.get("zero_optimization", {})
    if not isinstance(zero, dict):
        problems.append(("deepspeed.zero_optimization", "must be a mapping, e.g. {stage: 2}"))
    elif zero.get("stage", 0) not in SUPPORTED_ZERO_STAGES:
        problems.append(
            (
                "deepspeed.zero_optimization.stage",
                f"stage {zero.get('stage')!r} is not supported: use 0, 1 or 2 "
                "(ZeRO-3 re-partitions parameters, which Regimen's techniques cannot follow yet)",
            )
        )
    return problems


def build_ds_config(recipe: Recipe) -> dict[str, Any]:
    """The full DeepSpeed config: native keys deep-merged under the derived ones."""
    return deep_merge(recipe.deepspeed, derived_config(recipe))
