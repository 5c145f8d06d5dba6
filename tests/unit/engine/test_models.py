"""Models: HF from config, real `from_pretrained` on a tiny model saved locally, user factories."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import TINY_RECIPE
from orchestrator.engine.models import build_model, vocab_size
from orchestrator.errors import UsageError
from orchestrator.recipe.schema import ModelConfig

TINY = TINY_RECIPE["model"]["config"]


def test_config_models_are_seeded():
    a = build_model(ModelConfig(config=TINY), seed=1)
    b = build_model(ModelConfig(config=TINY), seed=1)
    c = build_model(ModelConfig(config=TINY), seed=2)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)
    assert vocab_size(a) == 256


def test_pretrained_loads_a_local_directory(tmp_path):
    config = transformers.LlamaConfig(**TINY)
    saved = transformers.LlamaForCausalLM(config)
    saved.save_pretrained(tmp_path / "tiny-llama")
    loaded = build_model(
        ModelConfig(kind="hf_pretrained", path=str(tmp_path / "tiny-llama")), seed=0
    )
    ref = dict(saved.named_parameters())
    assert all(torch.equal(ref[k], p) for k, p in loaded.named_parameters())


def test_pretrained_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="model.path"):
        build_model(ModelConfig(kind="hf_pretrained", path=str(tmp_path / "nope")), seed=0)


def test_factory_is_called_with_its_args():
    model = build_model(
        ModelConfig(
            kind="factory",
            factory="torch.nn:Linear",
            factory_args={"in_features": 3, "out_features": 5},
        ),
        seed=0,
    )
    assert isinstance(model, torch.nn.Linear) and model.out_features == 5


def test_factory_that_cannot_be_imported_names_the_key():
    with pytest.raises(UsageError, match="model.factory: cannot import module 'no_such_pkg'"):
        build_model(ModelConfig(kind="factory", factory="no_such_pkg:make"), seed=0)
