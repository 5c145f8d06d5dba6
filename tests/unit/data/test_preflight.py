"""Tokenizer and data problems are refused before launch: `regimen validate` (and `run`)
exits 2 with a line naming the key and the fix, and no traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from text_kit import build_tokenizer, chat_records, write_jsonl

from conftest import TINY_RECIPE, cli_exit
from orchestrator.cli import main
from orchestrator.control import controller
from orchestrator.errors import UsageError


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toks")
    return {
        "good": build_tokenizer(root / "good"),
        "no_template": build_tokenizer(root / "no_template", chat_template=False),
        "no_pad": build_tokenizer(root / "no_pad", pad=False),
    }


def recipe_file(tmp_path: Path, tokenizer: Path | None, vocab: int = 512, **data: Any) -> str:
    body = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    body["model"]["config"]["vocab_size"] = vocab
    if tokenizer is not None:
        body["model"]["tokenizer"] = str(tokenizer)
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(4))
    body["data"] = {"kind": "dataset", "paths": [str(path)], "format": "chat", "seq_len": 64,
                    "cache_dir": str(tmp_path / "cache"), **data}  # fmt: skip
    out = tmp_path / "r.yaml"
    out.write_text(yaml.safe_dump(body))
    return str(out)


def exit_of(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code, _, err = cli_exit(capsys, *args)
    return code, err


def test_a_good_recipe_validates(tmp_path, capsys, tokenizers):
    with pytest.raises(SystemExit) as exit_:
        main(["validate", recipe_file(tmp_path, tokenizers["good"])])
    assert exit_.value.code == 0 and "valid" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("tok", "vocab", "data", "needles"),
    [
        ("good", 256, {}, ["model.tokenizer: the tokenizer at", "has 400 tokens", "hold 256",
                           "model.config.vocab_size"]),
        ("no_template", 512, {}, ["data.format: chat needs a chat template", "tok.chat_template"]),
        ("no_pad", 512, {"packing": False}, ["data.packing: false pads every sample",
                                             "no pad token", "tok.pad_token = tok.eos_token"]),
        (None, 512, {}, ["model.tokenizer: data.kind dataset needs a tokenizer"]),
        ("good", 512, {"paths": ["missing/*.jsonl"]},
         ["data.paths: 'missing/*.jsonl' matches no file"]),
        ("good", 512, {"eval_paths": ["gone.parquet"]}, ["data.eval_paths: 'gone.parquet'"]),
    ],
)  # fmt: skip
def test_a_problem_exits_2_naming_the_key(tmp_path, capsys, tokenizers, tok, vocab, data, needles):
    path = recipe_file(tmp_path, tokenizers[tok] if tok else None, vocab, **data)
    code, err = exit_of(capsys, "validate", path)
    assert code == 2 and "Traceback" not in err and err.startswith("error: ")
    for needle in needles:
        assert needle in err


def test_no_pad_token_is_fine_when_packing(tmp_path, capsys, tokenizers):
    with pytest.raises(SystemExit) as exit_:
        main(["validate", recipe_file(tmp_path, tokenizers["no_pad"])])
    assert exit_.value.code == 0 and "valid" in capsys.readouterr().out


def test_an_unreadable_tokenizer_dir_names_the_key(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = exit_of(capsys, "validate", recipe_file(tmp_path, tmp_path / "empty"))
    assert code == 2 and "model.tokenizer: cannot load a tokenizer from" in err


def test_run_refuses_before_ray_starts(tmp_path, capsys, tokenizers, monkeypatch):
    def no_ray(*_: Any, **__: Any) -> None:
        raise AssertionError("Ray started before the preflight")

    monkeypatch.setattr("orchestrator.cluster.launch.ensure_ray", no_ray)
    code, err = exit_of(capsys, "run", recipe_file(tmp_path, tokenizers["no_template"]))
    assert code == 2 and "data.format: chat needs a chat template" in err
    assert controller.run_variants  # the real one ran (and refused)


def test_the_tokenizer_path_defaults_to_a_pretrained_models_dir(tmp_path):
    from conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path, model={"kind": "hf_pretrained", "path": "/m"})
    assert recipe.model.tokenizer_path == "/m"
    assert tiny_recipe(tmp_path).model.tokenizer_path is None
    named = tiny_recipe(tmp_path, model={"kind": "hf_pretrained", "path": "/m", "tokenizer": "/t"})
    assert named.model.tokenizer_path == "/t"
    with pytest.raises(UsageError):
        from orchestrator.data.preflight import check_recipe

        check_recipe(tiny_recipe(tmp_path, model={"tokenizer": str(tmp_path / "none")}))


def test_a_pretrained_model_is_checked_against_its_own_tokenizer(tmp_path, capsys, tokenizers):
    """kind hf_pretrained: the tokenizer is the model directory's, the vocabulary its config's."""
    import shutil

    import transformers

    model_dir = tmp_path / "model"
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    config.save_pretrained(str(model_dir))  # the preflight reads config.json, no weights
    for file in tokenizers["good"].iterdir():
        shutil.copy(file, model_dir / file.name)
    body = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    body["model"] = {"kind": "hf_pretrained", "path": str(model_dir)}
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(2))
    body["data"] = {"kind": "dataset", "paths": [str(data)], "format": "chat"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    code, err = exit_of(capsys, "validate", str(tmp_path / "r.yaml"))
    assert code == 2 and "model.path: the tokenizer at" in err and "hold 256 (model.path)" in err
