"""A tiny pretrained-style Hugging Face model directory, built in code (no network): a byte-level
BPE tokenizer trained on a few strings and a seeded 2-layer LLaMA sized to its vocabulary.

Stands in for the fixture-sft helper's pretrained tiny LLaMA until that lands; the byte-level
alphabet makes every id below 256 a token, so byte-token data (``stdlib_bytes``) fits too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.getcwd())\n",
    "the quick brown fox jumps over the lazy dog",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
]


def build_tokenizer(out: Path) -> Path:
    """Train a byte-level BPE tokenizer (bos/eos/pad set) and save_pretrained it to ``out``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 8, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(out)
    return out


def build_tiny_hf(out: Path, seed: int = 0, hidden: int = 32) -> Path:
    """``out`` holding a seeded LlamaForCausalLM (2 layers) and its tokenizer, save_pretrained."""
    import torch
    import transformers

    build_tokenizer(out)
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


# Loads an exported directory in a fresh interpreter, as a user would: logits of the fixed
# ids in argv[2] saved to argv[3], and a generated text printed.
LOAD_AND_GENERATE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
path, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
model.eval()
with torch.no_grad():
    torch.save(model(torch.tensor([ids])).logits, out)
gen = pipeline("text-generation", model=model, tokenizer=tok)
text = gen("def add", max_new_tokens=8, do_sample=False)[0]["generated_text"]
print("GENERATED", json.dumps(text))
"""

# Token ids whose logits the export tests compare (all inside the tiny models' vocabularies).
IDS = [5, 17, 42, 99, 200, 3, 256, 7]


def load_hf(path: Path) -> Any:
    """The causal LM saved at ``path``, in fp32, from local files only."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=torch.float32
    )


def logits_of(model: Any, ids: list[int] = IDS) -> Any:
    """``model``'s logits for ``ids`` in eval mode, without gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def trained(path: Path) -> Any:
    """The model at ``path`` with its weights moved, as if trained (an export must carry
    the change)."""
    import torch

    model = load_hf(path)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def fresh_process_load(path: Path, tmp_path: Path) -> tuple[Any, str]:
    """Logits of IDS and a generated text from ``path``, loaded in a new interpreter."""
    import torch

    out = tmp_path / f"fresh-{path.name}.pt"
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, str(path), json.dumps(IDS), str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("GENERATED "))
    return torch.load(out, weights_only=True), json.loads(line.removeprefix("GENERATED "))


def load_logged_model(tracking_uri: str, model_id: str) -> Any:
    """The transformers pipeline MLflow loads from the logged model ``model_id`` (the global
    tracking URI set for the call and put back after it)."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.transformers.load_model(f"models:/{model_id}")
    finally:
        mlflow.set_tracking_uri(previous)
