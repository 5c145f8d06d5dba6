"""The `deepspeed:` section against the rest of the recipe: derived keys, owned blocks, ZeRO keys.

Regimen owns batch sizes, clipping, precision, optimizer and scheduler (it sets the
LR itself every step). A native key that contradicts what the recipe says
elsewhere is an error with the fix, never a silent override. The worker merges the
native keys under :func:`derived_config` (:func:`orchestrator.engine.ds_config.build_ds_config`).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe

SUPPORTED_ZERO_STAGES = (0, 1, 2)
# DeepSpeedZeroConfig's fields and aliases (deepspeed 0.19; it forbids extra keys, so a typo
# here would only fail at deepspeed.initialize on the workers, after Ray started).
# tests/unit/recipe/test_hardening.py checks this list against the installed DeepSpeed.
ZERO_KEYS = frozenset(
    {
        "allgather_bucket_size",
        "allgather_partitions",
        "allgather_sequential",
        "compute_grad_norm",
        "contiguous_gradients",
        "cpu_offload",
        "cpu_offload_param",
        "cpu_offload_use_pin_memory",
        "elastic_checkpoint",
        "enable_sanity_checks",
        "gather_16bit_weights_on_model_save",
        "ignore_unused_parameters",
        "leaf_module",
        "legacy_stage1",
        "load_from_fp32_weights",
        "log_trace_cache_warnings",
        "max_live_parameters",
        "max_reuse_distance",
        "memory_efficient_linear",
        "model_persistence_threshold",
        "module_granularity_threshold",
        "offload_optimizer",
        "offload_param",
        "overlap_comm",
        "override_module_apply",
        "param_persistence_threshold",
        "parameter_alignment",
        "pipeline_loading_checkpoint",
        "prefetch_bucket_size",
        "reduce_bucket_size",
        "reduce_scatter",
        "round_robin_gradients",
        "save_muon_momentum_buffer_in_memory",
        "stage",
        "stage3_allgather_sequential",
        "stage3_gather_16bit_weights_on_model_save",
        "stage3_gather_fp16_weights_on_model_save",
        "stage3_max_live_parameters",
        "stage3_max_reuse_distance",
        "stage3_model_persistence_threshold",
        "stage3_module_granularity_threshold",
        "stage3_param_persistence_threshold",
        "stage3_prefetch_bucket_size",
        "stage3_use_all_reduce_for_fetch_params",
        "sub_group_size",
        "use_all_reduce_for_fetch_params",
        "use_multi_rank_bucket_allreduce",
        "zenflow",
        "zero_hpz_partition_size",
        "zero_quantized_gradients",
        "zero_quantized_nontrainable_weights",
        "zero_quantized_weights",
    }
)
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
    else:
        for key in sorted(set(zero) - ZERO_KEYS, key=str):
            close = difflib.get_close_matches(str(key), ZERO_KEYS, n=1)
            fix = f"did you mean '{close[0]}'?" if close else "remove it"
            problems.append((f"deepspeed.zero_optimization.{key}", f"unknown ZeRO key: {fix}"))
    if isinstance(zero, dict) and zero.get("stage", 0) not in SUPPORTED_ZERO_STAGES:
        problems.append(
            (
                "deepspeed.zero_optimization.stage",
                f"stage {zero.get('stage')!r} is not supported: use 0, 1 or 2 "
                "(ZeRO-3 re-partitions parameters, which Regimen's techniques cannot follow yet)",
            )
        )
    return problems
