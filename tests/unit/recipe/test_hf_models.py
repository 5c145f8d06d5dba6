"""`model:` checks for Hugging Face models, made without transformers: `architecture` is any
causal-LM model type, `model.config` keys and value types are checked against its config
class (from the shipped table), each problem at its FILE:LINE; attention implementation and
dtype against the rest of the recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import cli_exit
from orchestrator.errors import RecipeError
from orchestrator.recipe import hf_models
from orchestrator.recipe.hf_models import attention_implementation
from orchestrator.recipe.loader import load_recipe, load_recipe_data

D = 0.1  # the dropout every architecture is built with (the schedule needs a site to drive)
_DECODER = {
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 64,
}
_GQA = {**_DECODER, "num_key_value_heads": 2, "attention_dropout": D}
# Tiny configs of twelve HF model types; the integration test trains each of them.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": _GQA,
    "mistral": _GQA,
    "qwen2": _GQA,
    "qwen3": {**_GQA, "head_dim": 16},
    "gemma": {**_GQA, "head_dim": 16},
    "phi3": {**_GQA, "resid_pdrop": D, "embd_pdrop": D, "pad_token_id": 0, "eos_token_id": 1},
    "gpt_neox": {**_DECODER, "attention_dropout": D, "hidden_dropout": D},
    "olmo2": {**_GQA, "pad_token_id": 1, "eos_token_id": 2},
    "mixtral": {**_GQA, "num_local_experts": 2, "num_experts_per_tok": 1},
    "gpt2": {
        "vocab_size": 256, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
        "resid_pdrop": D, "embd_pdrop": D, "attn_pdrop": D, "bos_token_id": 0, "eos_token_id": 0,
    },
    "opt": {
        **{k: v for k, v in _DECODER.items() if k != "intermediate_size"},
        "ffn_dim": 64, "word_embed_proj_dim": 32, "dropout": D, "attention_dropout": D,
    },
    "falcon": {
        "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "attention_dropout": D, "hidden_dropout": D,
    },
}  # fmt: skip


def _write(tmp_path: Path, model: dict[str, Any], **sections: Any) -> Path:
    path = tmp_path / "recipe.yaml"
    data = {"name": "hf", "schedule": {"steps": 2}, "model": model, **sections}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return str(info.value).splitlines()


def _line_of(path: Path, text: str) -> int:
    return next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if text in ln)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_validates_and_its_typo_is_located(arch, tmp_path):
    config = ARCHITECTURES[arch]
    load_recipe(_write(tmp_path, {"architecture": arch, "config": config}))
    key = next(iter(config))
    typo = key[:2] + key[3] + key[2] + key[4:]  # vocab_size -> vocba_size
    path = _write(tmp_path, {"architecture": arch, "config": {**config, typo: config[key]}})
    cls = hf_models.config_class(arch)
    assert _problems(path) == [
        f"{path}:{_line_of(path, typo)}: model.config.{typo}: unknown key for {cls}; "
        f"did you mean '{key}'?"
    ]


def test_the_issue_example_and_a_wrong_type_are_both_reported_at_their_lines(tmp_path):
    path = _write(
        tmp_path,
        {"architecture": "llama", "config": {"vcoab_size": 256, "hidden_size": "64",
                                             "rms_norm_eps": 1, "tie_word_embeddings": "yes"}},
    )  # fmt: skip
    line = _line_of(path, "vcoab_size")
    assert _problems(path) == [
        f"{path}:{line}: model.config.vcoab_size: unknown key for LlamaConfig; "
        "did you mean 'vocab_size'?",
        f"{path}:{line + 1}: model.config.hidden_size: LlamaConfig expects int, got str '64': "
        "give an int",
        f"{path}:{line + 2}: model.config.rms_norm_eps: LlamaConfig expects float, got int 1: "
        "write 1.0",
        f"{path}:{line + 3}: model.config.tie_word_embeddings: LlamaConfig expects bool, got str "
        "'yes': give a bool",
    ]


def test_the_cli_exits_2_on_an_unknown_key(tmp_path, capsys):
    path = _write(tmp_path, {"architecture": "llama", "config": {"vcoab_size": 256}})
    code, _, err = cli_exit(capsys, "validate", str(path))
    assert code == 2
    assert (
        f"{path}:{_line_of(path, 'vcoab_size')}: model.config.vcoab_size: unknown key for "
        "LlamaConfig; did you mean 'vocab_size'?" in err
    )


def test_aliases_and_common_keys_are_accepted():
    load_recipe_data(
        {
            "name": "a",
            "schedule": {"steps": 1},
            "model": {
                "architecture": "gpt2",
                "config": {"hidden_size": 32, "num_hidden_layers": 2, "rope_theta": 10000.0,
                           "output_hidden_states": False, "eos_token_id": [0, 1]},
            },
        }
    )  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("lamma", "'lamma' is not a transformers causal-LM model type: did you mean 'llama'?"),
        ("qwen_3", "did you mean 'qwen3'?"),
        ("t5", "transformers model type 't5' has no causal-LM class"),
    ],
)
def test_unknown_architectures_get_a_did_you_mean(arch, message, tmp_path):
    path = _write(tmp_path, {"architecture": arch})
    (line,) = _problems(path)
    assert line.startswith(f"{path}:{_line_of(path, 'architecture')}: model.") and message in line


def test_a_newer_transformers_leaves_the_check_to_the_engine(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_models, "table_applies", lambda: False)
    load_recipe(_write(tmp_path, {"architecture": "not_in_table", "config": {"x": 1}}))


def test_the_table_is_the_installed_transformers(monkeypatch):
    from importlib import metadata

    assert hf_models.table_applies() == (
        metadata.version("transformers").split(".")[:2]
        == hf_models.table()["transformers"].split(".")[:2]
    )
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt_neox", "olmo2",
            "mixtral", "gpt2", "opt", "falcon"} <= set(hf_models.model_types())  # fmt: skip


def test_attention_is_sdpa_unless_attention_entropy_is_measured(tmp_path):
    base = {"name": "a", "schedule": {"steps": 1}, "checkpoint": {"every": 1}}
    assert attention_implementation(load_recipe_data(base)) == "sdpa"
    entropy = {**base, "stability": {"indicators_every": 2}}
    assert attention_implementation(load_recipe_data(entropy)) == "eager"
    explicit = {**base, "model": {"attn_implementation": "eager"}}
    assert attention_implementation(load_recipe_data(explicit)) == "eager"
    off = {**base, "stability": {"indicators_every": 0}}
    assert attention_implementation(load_recipe_data(off)) == "sdpa"
    path = _write(
        tmp_path,
        {"attn_implementation": "sdpa"},
        stability={"indicators_every": 2},
        checkpoint={"every": 1},
    )
    (line,) = _problems(path)
    assert "model.attn_implementation: 'sdpa' never materialises" in line
    assert "stability.indicators_every" in line


@pytest.mark.parametrize(
    ("dtype", "precision", "ok"),
    [("float32", "bf16", True), ("bfloat16", "bf16", True), ("float16", "fp16", True),
     ("bfloat16", "fp32", False), ("float16", "bf16", False), ("bfloat16", "fp16", False)],
)  # fmt: skip
def test_dtype_agrees_with_the_run_precision(dtype, precision, ok, tmp_path):
    path = _write(tmp_path, {"dtype": dtype}, precision=precision)
    if ok:
        load_recipe(path)
        return
    (line,) = _problems(path)
    assert f"model.dtype: {dtype} weights need precision:" in line
    assert f"the run's precision is {precision}" in line


def test_deepspeed_bf16_against_float16_weights_is_refused(tmp_path):
    path = _write(tmp_path, {"dtype": "float16"}, precision="fp16",
                  deepspeed={"bf16": {"enabled": True}})  # fmt: skip
    assert any("bf16" in p for p in _problems(path))


def test_builtin_models_refuse_hf_only_keys(tmp_path):
    path = _write(
        tmp_path,
        {"kind": "builtin", "architecture": "mlp", "gradient_checkpointing": True,
         "attn_implementation": "eager"},
    )  # fmt: skip
    found = _problems(path)
    assert any("model.gradient_checkpointing: the builtin models do not support" in p
               for p in found)  # fmt: skip
    assert any("model.attn_implementation: applies to Hugging Face models only" in p
               for p in found)  # fmt: skip


def test_lisa_knows_the_default_depth_of_any_architecture(tmp_path):
    """qwen3 was not among the four architectures LISA's check used to know."""
    path = _write(tmp_path, {"architecture": "qwen3"}, techniques={"lisa": {"gamma": 40}})
    (line,) = _problems(path)
    assert "techniques.lisa.gamma: 40 is more than the model's 32 layers" in line


def _saved_model(tmp_path: Path, model_type: str = "llama") -> Path:
    """A model directory as far as the recipe check reads it: its config.json."""
    model_dir = tmp_path / "pretrained"
    model_dir.mkdir(exist_ok=True)
    saved = {"model_type": model_type, "vocab_size": 300, "hidden_size": 32}
    (model_dir / "config.json").write_text(json.dumps(saved))
    return model_dir


def test_a_pretrained_models_config_override_typo_is_located(tmp_path, capsys):
    """kind hf_pretrained: model.config overrides the saved config.json, so its keys are
    checked against the config class of the saved model_type (gpt2 here, not llama)."""
    model = {"kind": "hf_pretrained", "path": str(_saved_model(tmp_path, "gpt2")),
             "config": {"atn_pdrop": 0.2, "resid_pdrop": "0.1"}}  # fmt: skip
    path = _write(tmp_path, model)
    line = _line_of(path, "atn_pdrop")
    expected = [
        f"{path}:{line}: model.config.atn_pdrop: unknown key for GPT2Config; "
        "did you mean 'attn_pdrop'?",
        f"{path}:{line + 1}: model.config.resid_pdrop: GPT2Config expects float or int, got str "
        "'0.1': give a float",
    ]
    assert _problems(path) == expected
    code, _, err = cli_exit(capsys, "validate", str(path))
    assert code == 2 and expected[0] in err


def test_a_pretrained_models_valid_override_passes(tmp_path):
    model = {"kind": "hf_pretrained", "path": str(_saved_model(tmp_path)),
             "config": {"attention_dropout": 0.25, "rope_theta": 500000.0}}  # fmt: skip
    recipe = load_recipe(_write(tmp_path, model)).recipe
    assert recipe.model.config == {"attention_dropout": 0.25, "rope_theta": 500000.0}


def test_a_pretrained_path_without_a_config_is_left_to_the_path_checks(tmp_path):
    """No config.json to read (yet): no model type to check against, and no second report
    of the path (the preflight and the model build name model.path)."""
    model = {"kind": "hf_pretrained", "path": str(tmp_path / "not-yet"),
             "config": {"attention_dropuot": 0.25}}  # fmt: skip
    load_recipe(_write(tmp_path, model))
    (tmp_path / "not-yet").mkdir()
    (tmp_path / "not-yet" / "config.json").write_text("{not json")
    load_recipe(_write(tmp_path, model))
    assert hf_models.saved_model_type(str(tmp_path / "not-yet")) is None
