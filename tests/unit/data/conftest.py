"""Fixtures of the data tests: a real tokenizer (BPE trained here) saved in a tmp dir."""

from __future__ import annotations

from pathlib import Path

import pytest
from text_kit import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BPE tokenizer with a pad token and a ChatML-style chat template."""
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from orchestrator.data.tokenizers import load_tokenizer

    return load_tokenizer(tokenizer_dir)
