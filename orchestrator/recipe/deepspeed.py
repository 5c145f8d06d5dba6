"""The `deepspeed:` section: every key checked, `"auto"` resolved, conflicts refused.

Regimen owns batch sizes, clipping, precision and the optimizer (it sets the LR itself
every step), and refuses DeepSpeed's scheduler. A native key that contradicts what the
recipe says elsewhere is an error with the fix, never a silent override. `"auto"` (the
convention of HF Trainer, Accelerate and Axolotl configs) means "what the recipe says"
for the owned keys and DeepSpeed's default for ZeRO bucket sizes; an `optimizer:` block is
accepted when each value is `"auto"` or agrees with the recipe's `optimizer:` section.

Every key at every level is checked against hand-kept key sets (the recipe layer imports
no DeepSpeed); tests/unit/recipe/test_deepspeed_keys.py checks them against the installed
DeepSpeed's config models. :func:`resolved_config` is the config the engine is built with
(:func:`orchestrator.engine.ds_config.build_ds_config`) and what `regimen plan` shows.
"""

from __future__ import annotations

import copy
import difflib
import math
from typing import TYPE_CHECKING, Any

from orchestrator.recipe.dotted import deep_merge

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe

AUTO = "auto"
SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)
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

# The top-level keys DeepSpeedConfig reads (deepspeed 0.19), plus the two that
# deepspeed.initialize reads itself (sequence/data parallel sizes).
TOP_KEYS = frozenset(
    {
        "activation_checkpointing", "aio", "autotuning", "bf16", "bfloat16", "checkpoint",
        "comet", "comms_logger", "communication_data_type", "compile", "csv_monitor",
        "data_efficiency", "data_parallel_size", "data_types", "dataloader_drop_last",
        "datastates_ckpt", "disable_allgather", "disable_python_gc", "dump_state",
        "expert_parallel", "flops_profiler", "fp16", "gradient_accumulation_steps",
        "gradient_allreduce_op", "gradient_clipping", "gradient_predivide_factor",
        "hybrid_engine", "log_level", "managed_gradient_accumulation", "memory_breakdown",
        "optimizer", "pipeline", "prescale_gradients", "scheduler",
        "seq_parallel_communication_data_type", "sequence_parallel_size", "steps_per_print",
        "tensor_parallel", "tensorboard", "timers", "torch_autocast", "train_batch_size",
        "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism",
        "wall_clock_breakdown", "wandb", "weight_quantization", "zero_allow_untested_optimizer",
        "zero_force_ds_cpu_optimizer", "zero_optimization",
    }
)  # fmt: skip
OFFLOAD_OPTIMIZER_KEYS = frozenset(
    {
        "buffer_count", "cpuadam_cores_perc", "device", "fast_init", "nvme_path",
        "pin_memory", "pipeline_read", "pipeline_write", "ratio", "super_offload",
    }
)  # fmt: skip
OFFLOAD_PARAM_KEYS = frozenset(
    {"buffer_count", "buffer_size", "device", "max_in_cpu", "nvme_path", "pin_memory"}
)
BF16_KEYS = frozenset(
    {
        "bf16_master_weights_and_grads", "bf16_optimizer_states", "check_grad_overflow",
        "enabled", "immediate_grad_update",
    }
)  # fmt: skip
FP16_KEYS = frozenset(
    {
        "auto_cast", "consecutive_hysteresis", "enabled", "fp16_master_weights_and_grads",
        "hysteresis", "initial_scale_power", "loss_scale", "loss_scale_window", "min_loss_scale",
    }
)  # fmt: skip
ACTIVATION_CHECKPOINTING_KEYS = frozenset(
    {
        "contiguous_memory_optimization", "cpu_checkpointing", "number_checkpoints",
        "partition_activations", "profile", "synchronize_checkpoint_boundary",
    }
)  # fmt: skip
FLOPS_PROFILER_KEYS = frozenset(
    {
        "detailed", "enabled", "module_depth", "output_file", "profile_step",
        "recompute_fwd_factor", "top_modules",
    }
)  # fmt: skip
COMMS_LOGGER_KEYS = frozenset({"debug", "enabled", "prof_all", "prof_ops", "verbose"})
# Regimen builds the optimizer from the recipe's `optimizer:` section; a DeepSpeed block
# may only restate it: these params, each agreeing with the recipe key of the same name.
OPTIMIZER_PARAMS = frozenset({"lr", "betas", "eps", "weight_decay", "momentum"})
# The keys checked one by one, per section (dotted below `deepspeed.`); sections not
# listed here (aio, pipeline, monitors, ...) are passed to DeepSpeed as written.
SECTION_KEYS: dict[str, frozenset[str]] = {
    "": TOP_KEYS,
    "zero_optimization": ZERO_KEYS,
    "zero_optimization.offload_optimizer": OFFLOAD_OPTIMIZER_KEYS,
    "zero_optimization.offload_param": OFFLOAD_PARAM_KEYS,
    "bf16": BF16_KEYS,
    "bfloat16": BF16_KEYS,
    "fp16": FP16_KEYS,
    "activation_checkpointing": ACTIVATION_CHECKPOINTING_KEYS,
    "flops_profiler": FLOPS_PROFILER_KEYS,
    "comms_logger": COMMS_LOGGER_KEYS,
    "optimizer": frozenset({"type", "params"}),
    "optimizer.params": OPTIMIZER_PARAMS,
}
# `"auto"` for a ZeRO size means DeepSpeed's default (DeepSpeedZeroConfig, deepspeed 0.19).
ZERO_AUTO_DEFAULTS: dict[str, int] = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "prefetch_bucket_size": 50_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "param_persistence_threshold": 100_000,
    "stage3_param_persistence_threshold": 100_000,
    "max_live_parameters": 1_000_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "max_reuse_distance": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "sub_group_size": 1_000_000_000,
}
# Where `"auto"` is accepted (dotted below `deepspeed.`): the keys Regimen derives, the
# optimizer block's params, and the ZeRO sizes.
AUTO_KEYS = frozenset(
    {
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "bf16.enabled",
        "bfloat16.enabled",
        "fp16.enabled",
        "optimizer.type",
        *(f"optimizer.params.{k}" for k in sorted(OPTIMIZER_PARAMS)),
        *(f"zero_optimization.{k}" for k in ZERO_AUTO_DEFAULTS),
    }
)
_OPTIMIZER_TYPES = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}
_REFUSED_BLOCKS = {"scheduler": "set the LR schedule with `techniques.warmup`"}


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
    }


# Regimen's defaults for DeepSpeed's logging; native keys may change them.
QUIET_DEFAULTS: dict[str, Any] = {"steps_per_print": 10**9, "wall_clock_breakdown": False}


def resolved_config(recipe: Recipe) -> dict[str, Any]:
    """The DeepSpeed config the engine is built with: every `"auto"` resolved.

    Native keys over Regimen's logging defaults, under the derived keys (which agree
    with the native ones, or replace their `"auto"`). The `optimizer:` block is dropped:
    it was checked to agree with the recipe, which builds the optimizer.
    """
    native = copy.deepcopy(recipe.deepspeed)
    native.pop("optimizer", None)
    zero = native.get("zero_optimization")
    if isinstance(zero, dict):
        for key, value in zero.items():
            if value == AUTO and key in ZERO_AUTO_DEFAULTS:
                zero[key] = ZERO_AUTO_DEFAULTS[key]
    if isinstance(native.get("bfloat16"), dict):  # DeepSpeed's old name for bf16
        native["bf16"] = deep_merge(native.pop("bfloat16"), native.get("bf16") or {})
    return deep_merge(deep_merge(QUIET_DEFAULTS, native), derived_config(recipe))


def resolved_autos(recipe: Recipe) -> dict[str, Any]:
    """Each `"auto"` of the `deepspeed:` section (dotted) and the value it resolves to."""
    resolved = resolved_config(recipe)
    optimizer = _recipe_optimizer(recipe)
    out: dict[str, Any] = {}
    for key in sorted(AUTO_KEYS):
        parts = key.split(".")
        node: Any = recipe.deepspeed
        for part in parts:
            node = node.get(part) if isinstance(node, dict) else None
        if node != AUTO:
            continue
        if parts[0] == "optimizer":
            out[key] = optimizer[parts[-1]]
        else:
            node = resolved
            for part in ["bf16", *parts[1:]] if parts[0] == "bfloat16" else parts:
                node = node[part]
            out[key] = node
    return out


def _recipe_optimizer(recipe: Recipe) -> dict[str, Any]:
    """The recipe's optimizer in DeepSpeed's words: type and each param's value."""
    o = recipe.optimizer
    return {
        "type": _OPTIMIZER_TYPES[o.name],
        "lr": o.lr,
        "betas": list(o.betas),
        "eps": o.eps,
        "weight_decay": o.weight_decay,
        "momentum": o.momentum,
    }


def _agrees(native: Any, recipe_value: Any) -> bool:
    if isinstance(recipe_value, list):
        return (
            isinstance(native, (list, tuple))
            and len(native) == len(recipe_value)
            and all(_agrees(a, b) for a, b in zip(native, recipe_value, strict=True))
        )
    if isinstance(native, bool) or not isinstance(native, (int, float)):
        return False
    return math.isclose(float(native), float(recipe_value), rel_tol=1e-9, abs_tol=0.0)


def _conflicts(derived: Any, native: Any, path: str, out: list[tuple[str, str]]) -> None:
    if isinstance(derived, dict) and isinstance(native, dict):
        for key, value in native.items():
            if key in derived:
                _conflicts(derived[key], value, f"{path}.{key}", out)
    elif native != AUTO and derived != native:
        out.append(
            (
                path,
                f"is {native!r} here but the recipe implies {derived!r}: remove it from "
                '`deepspeed:` (or write "auto") and set it through schedule/optimizer/'
                "precision instead",
            )
        )


def _key_problems(node: dict[Any, Any], path: str, out: list[tuple[str, str]]) -> None:
    """Unknown keys, misplaced `"auto"` and non-mapping sections, at every checked level."""
    allowed = SECTION_KEYS[path]
    for key, value in node.items():
        name = str(key)
        dotted = f"{path}.{name}" if path else name
        where = f"deepspeed.{dotted}"
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            what = "ZeRO key" if path == "zero_optimization" else "key"
            fix = f"did you mean '{close[0]}'?" if close else "remove it"
            out.append((where, f"unknown DeepSpeed {what} '{name}'{_section(path)}: {fix}"))
        elif value == AUTO and dotted not in AUTO_KEYS:
            out.append(
                (
                    where,
                    '"auto" is not accepted here (only for batch sizes, clipping, precision, '
                    "optimizer params and ZeRO bucket sizes): give a value",
                )
            )
        elif dotted in SECTION_KEYS:
            if isinstance(value, dict):
                _key_problems(value, dotted, out)
            elif dotted == "zero_optimization":
                out.append((where, "must be a mapping, e.g. {stage: 2}"))
            else:
                out.append((where, f"must be a mapping of {dotted} keys: write `{name}: {{...}}`"))


def _section(path: str) -> str:
    return f" in {path}" if path else ""


def _optimizer_problems(recipe: Recipe, block: dict[str, Any]) -> list[tuple[str, str]]:
    """An `optimizer:` block must be `"auto"` or agree with the recipe's `optimizer:`."""
    mine = _recipe_optimizer(recipe)
    problems: list[tuple[str, str]] = []
    kind = block.get("type")
    if kind is not None and kind != AUTO and str(kind).lower() != recipe.optimizer.name:
        problems.append(
            (
                "deepspeed.optimizer",
                f"type is {kind!r} here but the recipe's `optimizer:` section says name: "
                f'{recipe.optimizer.name} ({mine["type"]}): write type: "auto", remove the '
                "block, or make the two agree",
            )
        )
    params = block.get("params")
    if isinstance(params, dict):
        for key, value in params.items():
            if key not in OPTIMIZER_PARAMS or value == AUTO:
                continue
            if not _agrees(value, mine[key]):
                problems.append(
                    (
                        f"deepspeed.optimizer.params.{key}",
                        f"is {value!r} here but the recipe's optimizer.{key} is "
                        f'{mine[key]!r}: write "auto" (Regimen builds the optimizer from '
                        f"`optimizer:`), remove it, or set optimizer.{key} to the same value",
                    )
                )
    return problems


def ds_config_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """Unknown keys, misplaced `"auto"` and conflicts with what Regimen derives."""
    problems: list[tuple[str, str]] = []
    native = recipe.deepspeed
    _key_problems(native, "", problems)
    for block, fix in _REFUSED_BLOCKS.items():
        if block in native:
            problems.append((f"deepspeed.{block}", f"Regimen owns this block: {fix}"))
    if isinstance(native.get("optimizer"), dict):
        problems += _optimizer_problems(recipe, native["optimizer"])
    derived = derived_config(recipe)
    _conflicts(derived, native, "deepspeed", problems)
    if isinstance(native.get("bfloat16"), dict):
        _conflicts(derived["bf16"], native["bfloat16"], "deepspeed.bfloat16", problems)
    zero = native.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage != AUTO and stage not in SUPPORTED_ZERO_STAGES:
        problems.append(
            (
                "deepspeed.zero_optimization.stage",
                f"stage {zero.get('stage')!r} is not a ZeRO stage: use 0, 1, 2 or 3",
            )
        )
    return problems
