"""Build the network a recipe names: HF from a config, a local pretrained one, or a factory."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from orchestrator.errors import UsageError
from orchestrator.factories import resolve_factory

if TYPE_CHECKING:
    from orchestrator.recipe.schema import ModelConfig

_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt2": "gpt2"}


def build_model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """A freshly initialised (seeded) or loaded model in fp32 on the CPU."""
    torch.manual_seed(seed)
    if cfg.kind == "factory":
        model = resolve_factory(cfg.factory or "", "model.factory")(**cfg.factory_args)
        if not isinstance(model, torch.nn.Module):
            raise UsageError(
                f"model.factory: {cfg.factory} returned {type(model).__name__}, not an nn.Module"
            )
        return model
    import transformers

    if cfg.kind == "hf_pretrained":
        try:
            return transformers.AutoModelForCausalLM.from_pretrained(
                str(cfg.path), local_files_only=True, dtype=torch.float32
            )
        except OSError as exc:
            raise UsageError(
                f"model.path: cannot load a pretrained model from '{cfg.path}' ({exc}): "
                "give a local directory written by save_pretrained"
            ) from None
    config = transformers.AutoConfig.for_model(_ARCHITECTURES[cfg.architecture], **cfg.config)
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def vocab_size(model: torch.nn.Module) -> int | None:
    """The model's vocabulary size when it has an input embedding, else None."""
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        return None
    emb = get()
    return int(emb.num_embeddings) if emb is not None else None
