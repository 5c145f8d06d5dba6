"""Build the network a recipe names: HF from a config, a local pretrained one, or a factory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from orchestrator.errors import UsageError
from orchestrator.factories import resolve_factory

if TYPE_CHECKING:
    from orchestrator.recipe.schema import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(
    cfg: ModelConfig, seed: int, attn_implementation: str | None = None
) -> torch.nn.Module:
    """A freshly initialised (seeded) or loaded model on the CPU, in ``cfg.dtype``.

    ``attn_implementation`` is the run's (:func:`orchestrator.recipe.hf_models.
    attention_implementation`); default ``cfg.attn_implementation`` or sdpa.
    """
    torch.manual_seed(seed)
    if cfg.kind == "factory":
        model = resolve_factory(cfg.factory or "", "model.factory")(**cfg.factory_args)
        if not isinstance(model, torch.nn.Module):
            raise UsageError(
                f"model.factory: {cfg.factory} returned {type(model).__name__}, not an nn.Module"
            )
    else:
        model = _build_hf(cfg, attn_implementation or cfg.attn_implementation or "sdpa")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _build_hf(cfg: ModelConfig, attn: str) -> torch.nn.Module:
    import transformers

    dtype = _DTYPES[cfg.dtype]
    if cfg.kind == "hf_pretrained":
        try:
            config = transformers.AutoConfig.from_pretrained(str(cfg.path), local_files_only=True)
            _override(config, cfg.config)
            model: torch.nn.Module = transformers.AutoModelForCausalLM.from_pretrained(
                str(cfg.path),
                config=config,
                local_files_only=True,
                dtype=dtype,
                attn_implementation=attn,
            )
        except OSError as exc:
            raise UsageError(
                f"model.path: cannot load a pretrained model from '{cfg.path}' ({exc}): "
                "give a local directory written by save_pretrained"
            ) from None
        except RuntimeError as exc:
            if "mismatch" not in str(exc).lower():
                raise
            keys = ", ".join(f"model.config.{k}" for k in cfg.config) or "the saved config"
            raise UsageError(
                f"{keys}: the override changes the shapes of the weights saved in "
                f"'{cfg.path}', so they cannot be loaded; a pretrained model takes only "
                "overrides that keep its shapes (dropout, rope scaling, ...): remove it, or "
                "train a new model with kind: hf_config"
            ) from None
        return model
    config = hf_config(cfg.architecture, cfg.config)
    return transformers.AutoModelForCausalLM.from_config(
        config, dtype=dtype, attn_implementation=attn
    )


def hf_config(model_type: str, values: dict[str, Any]) -> Any:
    """The transformers config of ``model_type`` built from ``values`` (`model.config`),
    checked against the live config class: an unknown model type, an unknown key or a value
    of the wrong type is a UsageError naming the key (the recipe check's messages, for the
    model types its table does not know)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise UsageError(
            f"model.architecture: '{model_type}' is not a model type of transformers "
            f"{transformers.__version__}"
        )
    _check_live(CONFIG_MAPPING[model_type], values)
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except Exception as exc:  # strict dataclass validation (a wrong value type) and the like
        raise _config_error(exc) from None


def _override(config: Any, values: dict[str, Any]) -> None:
    """Set `model.config`'s ``values`` on the saved ``config`` of a pretrained model, each
    key checked against its live config class first."""
    _check_live(type(config), values)
    try:
        config.update(values)
    except Exception as exc:  # strict dataclass validation (a value out of range) and the like
        raise _config_error(exc) from None


def _config_error(exc: Exception) -> UsageError:
    """A transformers config's refusal of a `model.config` value, in one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return UsageError(f"model.config: {' '.join(lines[-2:])}")


def _check_live(cls: type, values: dict[str, Any]) -> None:
    """Raise a UsageError naming every key of ``values`` (`model.config`) that the live
    config class ``cls`` does not take, or takes with another type."""
    from orchestrator.engine.hf_table import config_keys
    from orchestrator.recipe.hf_models import check_config

    if problems := check_config(cls.__name__, config_keys(cls), values):
        raise UsageError("; ".join(f"{key}: {message}" for key, message in problems))


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn on HF gradient checkpointing, non-reentrant (frozen layers, as under LISA, and
    dropout recompute exactly: torch saves and restores the RNG state)."""
    kwargs = {"use_reentrant": False}
    if not getattr(model, "supports_gradient_checkpointing", True):
        enable = None
    elif callable(new := getattr(model, "activation_checkpointing_enable", None)):  # transformers 5
        new(activation_checkpointing_kwargs=kwargs)
        return
    else:
        enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable):
        raise UsageError(
            f"model.gradient_checkpointing: {type(model).__name__} has no "
            "gradient_checkpointing_enable(): remove the key, or checkpoint inside the model"
        )
    enable(gradient_checkpointing_kwargs=kwargs)


def vocab_size(model: torch.nn.Module) -> int | None:
    """The model's vocabulary size when it has an input embedding, else None."""
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        return None
    emb = get()
    return int(emb.num_embeddings) if emb is not None else None
