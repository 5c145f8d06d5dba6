"""The shipped table of config classes is what the installed transformers gives, and the
engine checks `model.config` against the live class where the table cannot."""

from __future__ import annotations

import pytest

from orchestrator.engine.hf_table import config_keys, json_types, table_json
from orchestrator.engine.models import hf_config
from orchestrator.errors import UsageError
from orchestrator.recipe.hf_models import TABLE_PATH


def test_the_shipped_table_is_regenerated_identically():
    assert TABLE_PATH.read_text() == table_json(), (
        "orchestrator/recipe/hf_configs.json is stale: run "
        "python -m orchestrator.engine.hf_table > orchestrator/recipe/hf_configs.json"
    )


def test_annotations_become_yaml_types():
    from typing import Literal

    assert json_types(int | None) == ["int", "null"]
    assert json_types(Literal["a", "b"]) == ["str"]
    assert json_types(list[int] | tuple[int, int]) == ["list"]
    assert json_types(dict[str, int]) == ["dict"]
    assert json_types(object) is None


def test_aliases_count_as_keys():
    import transformers

    keys = config_keys(transformers.GPT2Config)
    assert keys["hidden_size"] == keys["n_embd"] == ["int"]


def test_the_engine_names_an_unknown_key_and_a_wrong_type():
    with pytest.raises(UsageError, match="model.config.vcoab_size: unknown key for LlamaConfig; "
                       "did you mean 'vocab_size'"):  # fmt: skip
        hf_config("llama", {"vcoab_size": 8})
    with pytest.raises(UsageError, match="model.config.hidden_size: LlamaConfig expects int, got "
                       "str '64'"):  # fmt: skip
        hf_config("llama", {"hidden_size": "64"})
    with pytest.raises(UsageError, match="model.architecture: 'nope' is not a model type"):
        hf_config("nope", {})
