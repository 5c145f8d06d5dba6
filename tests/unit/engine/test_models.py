"""Models: HF from config, real `from_pretrained` on a tiny model saved locally, user factories."""

from __future__ import annotations

from typing import Any

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


def test_pretrained_config_overrides_take_effect_and_typos_are_refused(tmp_path):
    """kind hf_pretrained: model.config overrides keys of the saved config.json, checked
    against the live config class (also where the recipe check's table does not apply)."""
    saved = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    saved.save_pretrained(tmp_path / "m")
    path = str(tmp_path / "m")
    loaded = build_model(
        ModelConfig(kind="hf_pretrained", path=path, config={"attention_dropout": 0.25}), seed=0
    )
    assert loaded.config.attention_dropout == 0.25
    assert loaded.model.layers[0].self_attn.attention_dropout == 0.25  # what forward reads
    ref = dict(saved.named_parameters())
    assert all(torch.equal(ref[k], p) for k, p in loaded.named_parameters())  # still loaded
    with pytest.raises(
        UsageError,
        match="model.config.attention_dropuot: unknown key for LlamaConfig; "
        "did you mean 'attention_dropout'",
    ):
        build_model(
            ModelConfig(kind="hf_pretrained", path=path, config={"attention_dropuot": 0.25}),
            seed=0,
        )


def test_a_pretrained_override_that_changes_the_weight_shapes_is_a_clear_error(tmp_path):
    """model.config.hidden_size on a pretrained model cannot load its weights: a UsageError
    naming the key (exit 2), not transformers' size-mismatch traceback."""
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(tmp_path / "m")
    wider = {"hidden_size": TINY["hidden_size"] * 2}
    with pytest.raises(UsageError, match=r"model.config.hidden_size: the override changes"):
        build_model(ModelConfig(kind="hf_pretrained", path=str(tmp_path / "m"), config=wider), 0)


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


def _tiny(**model: Any) -> ModelConfig:
    return ModelConfig(config={**TINY, "attention_dropout": 0.2}, **model)


def test_attention_defaults_to_sdpa_and_follows_the_run():
    assert build_model(_tiny(), seed=0).config._attn_implementation == "sdpa"
    assert build_model(_tiny(), seed=0, attn_implementation="eager").config._attn_implementation \
        == "eager"  # fmt: skip
    explicit = build_model(_tiny(attn_implementation="eager"), seed=0)
    assert explicit.config._attn_implementation == "eager"


def test_the_trainer_builds_eager_attention_for_the_entropy_indicator(tmp_path, gloo_world):
    from conftest import tiny_recipe
    from orchestrator.engine.loop import Trainer, WorkerContext

    recipe = tiny_recipe(
        tmp_path, schedule={"steps": 2}, stability={"indicators_every": 1, "min_history": 2,
                                                    "window": 4}
    )  # fmt: skip
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"))
    trainer.run()
    assert trainer.model.config._attn_implementation == "eager"


def checkpointing(model: torch.nn.Module) -> bool:
    """Whether HF activation (gradient) checkpointing is on (either name of the flag)."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return bool(model.is_activation_checkpointing if flag else model.is_gradient_checkpointing)


def _grads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout masks for both models
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients_under_dropout_and_frozen_layers():
    plain = build_model(_tiny(), seed=0)
    ckpt = build_model(_tiny(gradient_checkpointing=True), seed=0)
    assert checkpointing(ckpt) and not checkpointing(plain)
    for model in (plain, ckpt):  # as LISA freezes inactive layers (and here the embeddings)
        for p in [*model.model.layers[0].parameters(), *model.model.embed_tokens.parameters()]:
            p.requires_grad_(False)
    x = torch.randint(0, 256, (2, 16))
    a, b = _grads(plain, x), _grads(ckpt, x)
    assert set(a) == set(b) and not any(n.startswith("model.layers.0.") for n in a)
    assert any(n.startswith("model.layers.1.") for n in a)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    torch.manual_seed(8)  # and dropout really is on: another mask, other gradients
    ckpt.zero_grad()
    ckpt(input_ids=x, labels=x).loss.backward()
    assert not all(torch.equal(a[n], p.grad) for n, p in ckpt.named_parameters() if n in a)


def test_a_factory_model_without_checkpointing_is_refused():
    with pytest.raises(UsageError, match="model.gradient_checkpointing: Linear has no"):
        build_model(
            ModelConfig(kind="factory", factory="torch.nn:Linear", gradient_checkpointing=True,
                        factory_args={"in_features": 3, "out_features": 5}),
            seed=0,
        )  # fmt: skip


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_weights_are_built_and_loaded_in_the_model_dtype(dtype, tmp_path):
    want = getattr(torch, dtype)
    built = build_model(_tiny(dtype=dtype), seed=0)
    assert {p.dtype for p in built.parameters()} == {want}
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(tmp_path / "m")
    loaded = build_model(ModelConfig(kind="hf_pretrained", path=str(tmp_path / "m"), dtype=dtype),
                         seed=0)  # fmt: skip
    assert {p.dtype for p in loaded.parameters()} == {want}
    assert loaded.config._attn_implementation == "sdpa"
