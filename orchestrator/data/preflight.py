"""Checks of a recipe's tokenizer and data before anything launches (driver side:
`regimen validate` and `regimen run`). They load the tokenizer and the model's config, so
they live here, not in the recipe layer (which imports no transformers).

Each problem names its recipe key and its fix; all of them are raised together as one
:class:`~orchestrator.errors.UsageError` (exit 2).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UsageError

if TYPE_CHECKING:
    from orchestrator.recipe.schema import DataConfig, ModelConfig, Recipe

PAD_FIX = (
    "give the tokenizer a pad token, e.g. `tok.pad_token = tok.eos_token; "
    'tok.save_pretrained(DIR)` (or set "pad_token" in DIR/tokenizer_config.json), or use '
    "data.packing: true"
)


def model_vocab_size(model: ModelConfig) -> int | None:
    """The model's embedding rows as its config says, without building it (None: unknown)."""
    if model.kind == "hf_config":
        if "vocab_size" in model.config:
            value = model.config["vocab_size"]
            return value if isinstance(value, int) else None
        from transformers import AutoConfig

        try:
            return int(AutoConfig.for_model(model.architecture).vocab_size)
        except (ValueError, AttributeError, TypeError):
            return None
    if model.kind == "hf_pretrained" and model.path:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(model.path), local_files_only=True)
        except (OSError, ValueError):
            return None  # the model build reports an unreadable path
        size = getattr(config, "vocab_size", None)
        if size is None and hasattr(config, "get_text_config"):
            size = getattr(config.get_text_config(), "vocab_size", None)
        return int(size) if isinstance(size, int) else None
    return None


def _section_problems(key: str, data: DataConfig, tokenizer: Any, tok_path: str) -> list[str]:
    from orchestrator.data.sources import resolve_paths

    problems = []
    for field, patterns in ((f"{key}.paths", data.paths), (f"{key}.eval_paths", data.eval_paths)):
        if patterns:
            try:
                resolve_paths(patterns, field)
            except UsageError as exc:
                problems.append(str(exc))
    if data.format == "chat" and not getattr(tokenizer, "chat_template", None):
        problems.append(
            f"{key}.format: chat needs a chat template, and the tokenizer at '{tok_path}' has "
            "none: set `tok.chat_template = ...` and save_pretrained it, or use format "
            "instruction, completion or text"
        )
    if data.format == "chat" and not getattr(tokenizer, "is_fast", False):
        problems.append(
            f"{key}.format: chat needs a fast tokenizer (a tokenizer.json) to find the "
            f"assistant turns; the one at '{tok_path}' is a slow one: convert it with "
            "AutoTokenizer.from_pretrained(DIR, use_fast=True).save_pretrained(DIR)"
        )
    if not data.packing and tokenizer.pad_token_id is None:
        problems.append(
            f"{key}.packing: false pads every sample, and the tokenizer at '{tok_path}' has no "
            f"pad token: {PAD_FIX}"
        )
    return problems


def check_recipe(recipe: Recipe) -> None:
    """Raise one UsageError listing every tokenizer/data problem of ``recipe`` (no-op for
    recipes that use no tokenizer)."""
    if not recipe.uses_tokenizer:
        return
    from orchestrator.data.tokenizers import load_tokenizer

    sections = [(k, d) for k, d in recipe.data_sections() if d.kind == "dataset"]
    tok_path = recipe.model.tokenizer_path
    if tok_path is None:
        raise UsageError(
            f"model.tokenizer: {sections[0][0]}.kind dataset needs a tokenizer: set "
            "model.tokenizer to a local tokenizer directory (model.kind hf_pretrained uses "
            "model.path)"
        )
    key = "model.tokenizer" if recipe.model.tokenizer else "model.path"
    tokenizer = load_tokenizer(Path(tok_path), key)
    problems: list[str] = []
    vocab = model_vocab_size(recipe.model)
    if vocab is not None and len(tokenizer) > vocab:
        where = "model.config.vocab_size" if recipe.model.kind == "hf_config" else "model.path"
        problems.append(
            f"{key}: the tokenizer at '{tok_path}' has {len(tokenizer)} tokens but the model's "
            f"embeddings hold {vocab} ({where}): token ids past {vocab - 1} would fail; use the "
            f"model's own tokenizer or a model with vocab_size >= {len(tokenizer)}"
        )
    for section_key, data in sections:
        problems += _section_problems(section_key, data, tokenizer, tok_path)
    shapes = {(d.seq_len, d.packing) for _, d in sections}
    if len(shapes) > 1:
        problems.append(
            "continual.stages: the dataset sections differ in seq_len or packing "
            f"({sorted(shapes)}): replay mixes their samples, so give them one seq_len and "
            "one packing"
        )
    if problems:
        raise UsageError("\n".join(problems))


def check_recipes(recipes: Iterable[Recipe]) -> None:
    """:func:`check_recipe` for each distinct model+data combination of ``recipes``."""
    seen: set[str] = set()
    for recipe in recipes:
        key = recipe.model.model_dump_json() + recipe.data.model_dump_json()
        key += recipe.continual.model_dump_json() if recipe.continual is not None else ""
        if key not in seen:
            seen.add(key)
            check_recipe(recipe)
