"""The run's tokenizer: loaded from a local directory, and its identity for the data cache."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError

# Files of a model directory that are weights or model config, not tokenizer: never hashed.
_NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json"}


def load_tokenizer(path: str | Path, key: str = "model.tokenizer") -> Any:
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)``; a clear
    :class:`UsageError` naming ``key`` when the directory holds no tokenizer."""
    from transformers import AutoTokenizer

    where = Path(str(path)).expanduser()
    if not where.is_dir():
        raise UsageError(
            f"{key}: '{path}' is not a directory: give a local tokenizer directory "
            "written by save_pretrained"
        )
    try:
        return AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"{key}: cannot load a tokenizer from '{path}' ({first}): give a local directory "
            "written by tokenizer.save_pretrained"
        ) from None


def tokenizer_files(path: str | Path) -> list[Path]:
    """The files of a tokenizer directory that define tokenization (weights and model
    config excluded), in a stable order."""
    root = Path(str(path)).expanduser()
    return sorted(
        p
        for p in root.iterdir()
        if p.is_file() and p.name not in _MODEL_FILES and not p.name.endswith(_NOT_TOKENIZER)
    )


def tokenizer_fingerprint(path: str | Path) -> str:
    """SHA-256 over the tokenizer files' names and contents."""
    digest = hashlib.sha256()
    for file in tokenizer_files(path):
        digest.update(file.name.encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()
