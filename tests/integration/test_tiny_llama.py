"""The example pretrained model (examples/tiny_llama.py), built once per session by the
`tiny_pretrained` fixture: it loads as any Hugging Face checkpoint in a fresh process, its
tokenizer round-trips text, its chat template marks the assistant's tokens, pretraining
lowered the held-out loss, it generates through `transformers.pipeline`, and its chat data
is deterministic with held-out questions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration

QUESTION = "What does json.dumps do?"

_FRESH = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
text = 'def dumps(obj, *, indent=None):\n    return _encode(obj)  # JSON text, \u00e9\t\n'
ids = tok(text)["input_ids"]
messages = [{"role": "user", "content": sys.argv[2]}]
prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
pipe = pipeline("text-generation", model=model, tokenizer=tok)
chat = pipe(messages, max_new_tokens=24, do_sample=False)[0]["generated_text"]
plain = pipe("import os\n", max_new_tokens=24, do_sample=False, return_full_text=False)
print(json.dumps({
    "model_class": type(model).__name__,
    "vocab": model.get_input_embeddings().num_embeddings,
    "tokens": len(tok),
    "pad": tok.pad_token, "bos": tok.bos_token, "eos": tok.eos_token,
    "pad_id": tok.pad_token_id, "eos_id": model.generation_config.eos_token_id,
    "tok_eos_id": tok.eos_token_id,
    "first_id": ids[0], "bos_id": tok.bos_token_id,
    "n_ids": len(ids),
    "round_trip": tok.decode(ids, skip_special_tokens=True),
    "text": text,
    "prompt": prompt,
    "chat_reply": chat[-1],
    "plain": plain[0]["generated_text"],
}))
"""


def test_it_loads_round_trips_renders_and_generates_in_a_fresh_process(
    tiny_pretrained: Path,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, str(tiny_pretrained / "model"), QUESTION],
        cwd=tiny_pretrained,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["model_class"] == "LlamaForCausalLM"
    assert got["vocab"] == got["tokens"]  # every token id has an embedding
    assert {got["pad"], got["bos"], got["eos"]} == {"<|pad|>", "<|bos|>", "<|eos|>"}
    assert got["pad_id"] is not None and got["pad_id"] != got["eos_id"]
    assert got["eos_id"] == got["tok_eos_id"]  # generation stops at the end of a turn
    assert got["first_id"] == got["bos_id"]  # plain text starts with bos, as LLaMA's
    assert got["round_trip"] == got["text"]
    assert got["n_ids"] < 0.75 * len(got["text"])  # BPE merges, not one token a byte
    assert got["prompt"] == f"<|bos|><|user|>\n{QUESTION}\n<|assistant|>\n"
    assert got["chat_reply"]["role"] == "assistant"
    assert got["chat_reply"]["content"].strip()
    assert got["plain"]  # new tokens (a 120-step model writes little more than layout)


def test_pretraining_lowered_the_held_out_loss(tiny_pretrained: Path) -> None:
    """By effect: on stdlib source it never trained on, the saved model's loss is far below
    that of the same architecture at initialisation (about ln(vocab))."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from examples.tiny_llama import heldout_loss, token_stream

    path = tiny_pretrained / "model"
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    heldout = (tiny_pretrained / "data" / "stdlib_heldout.txt").read_text(encoding="utf-8")
    stream = token_stream(tok, [heldout])
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(model.config)
    trained, at_init = heldout_loss(model, stream), heldout_loss(fresh, stream)
    assert at_init > 7.0  # ~ln(2048): the comparison is with an untrained model
    assert trained < at_init - 1.5, (trained, at_init)


def test_the_chat_template_masks_exactly_the_assistant_turns(tiny_pretrained: Path) -> None:
    """`return_assistant_tokens_mask` (transformers' `{% generation %}` spans) marks each
    assistant answer and its eos, never a role marker, the system or the user turn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pretrained / "model", local_files_only=True)
    messages = [
        {"role": "system", "content": "You answer questions about Python."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
        {"role": "user", "content": "And json.loads?"},
        {"role": "assistant", "content": "Deserialize s to a Python object."},
    ]
    out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask) and ids[0] == tok.bos_token_id
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(trained) == (
        "Serialize obj to a JSON formatted str.<|eos|>Deserialize s to a Python object.<|eos|>"
    )
    untrained = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert QUESTION in untrained and "You answer questions" in untrained
    assert "Serialize" not in untrained and "Deserialize" not in untrained
    assert untrained.count("<|assistant|>") == 2 and "<|eos|>" not in untrained
    with pytest.raises(Exception, match="roles are"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _asked(records: list[dict]) -> set[str]:
    """The dotted names the questions ask about (`json.dumps`)."""
    found = [re.search(r"\b[A-Za-z_]\w*(?:\.\w+)+", r["messages"][0]["content"]) for r in records]
    return {m.group(0) for m in found if m}


def test_chat_data_is_deterministic_and_asks_other_functions_in_eval(
    tiny_pretrained: Path, tmp_path: Path
) -> None:
    from examples.tiny_llama import write_chat_data

    data = tiny_pretrained / "data"
    train, held = (
        _read_jsonl(data / "stdlib_chat.jsonl"),
        _read_jsonl(data / "stdlib_chat_eval.jsonl"),
    )
    assert len(train) >= 200 and len(held) >= 20
    for record in train + held:
        user, assistant = record["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"].endswith((".", "?")) and len(assistant["content"]) >= 24
    asked, held_asked = _asked(train), _asked(held)
    assert len(asked) == len(train) and len(held_asked) == len(held)  # each function once
    assert not asked & held_asked  # eval asks about functions training never saw
    assert "json.dumps" in asked | held_asked

    again, _ = write_chat_data(tmp_path / "same", seed=0)
    assert again.read_bytes() == (data / "stdlib_chat.jsonl").read_bytes()
    other, _ = write_chat_data(tmp_path / "other", seed=1)
    assert other.read_bytes() != again.read_bytes()
