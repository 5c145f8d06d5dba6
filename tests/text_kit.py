"""A real tokenizer built in code (no network): a small byte-level BPE trained on standard
library docstrings, with special tokens, a pad token and a ChatML-style chat template, saved
with ``save_pretrained``; plus small record files in the formats users have."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def docstrings(limit: int = 400) -> list[str]:
    """Docstrings of stdlib modules' functions, in a stable order."""
    import collections
    import functools
    import itertools
    import json as json_mod
    import os.path
    import pathlib
    import re
    import string
    import textwrap

    out: list[str] = []
    for module in (
        os.path,
        re,
        json_mod,
        string,
        textwrap,
        functools,
        itertools,
        collections,
        pathlib,
    ):
        for name, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if doc and len(doc) > 40:
                out.append(doc)
    return out[:limit]


def build_tokenizer(
    out_dir: Path, vocab: int = 400, chat_template: bool = True, pad: bool = True
) -> Path:
    """Train a BPE tokenizer on docstrings and save it as a transformers tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok.train_from_iterator(docstrings(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if pad else None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def chat_records(n: int) -> list[dict[str, Any]]:
    """Conversations about docstrings: a system turn, then one or two user/assistant rounds."""
    docs = docstrings()
    out = []
    for i in range(n):
        doc = docs[i % len(docs)]
        messages = [
            {"role": "system", "content": "You explain Python."},
            {"role": "user", "content": f"What does function {i} do?"},
            {"role": "assistant", "content": doc.split("\n")[0]},
        ]
        if i % 2:
            messages += [
                {"role": "user", "content": "More?"},
                {"role": "assistant", "content": " ".join(doc.split()[:12])},
            ]
        out.append({"messages": messages})
    return out


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    """Records as JSON Lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
