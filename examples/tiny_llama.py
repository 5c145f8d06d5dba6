"""Build a small *pretrained* model and a chat dataset, here, with no download.

`build_tiny_llama(out_dir)` writes what a new user would otherwise fetch from a hub:

- ``out_dir/model/``: a tiny LLaMA (LlamaForCausalLM) pretrained for a few hundred steps on
  the Python standard library's own source, with its byte-level BPE tokenizer (trained here
  with the ``tokenizers`` library; bos/eos/pad tokens and a chat template) and a generation
  config, all written by ``save_pretrained``;
- ``out_dir/data/stdlib_chat.jsonl`` and ``stdlib_chat_eval.jsonl``: questions about stdlib
  functions answered by the first paragraph of their docstrings, as
  ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``; the eval file asks
  about other functions than the training file;
- ``out_dir/data/stdlib_heldout.txt``: stdlib source the model never saw in pretraining.

    python examples/tiny_llama.py --out examples/tiny-llama
    regimen run recipes/sft_lisa.yaml

The chat template marks each turn with a role token (``<|user|>``, ``<|assistant|>``,
``<|system|>``); an assistant turn ends with the eos token, and its content plus that eos
sit inside ``{% generation %}`` so ``apply_chat_template(..., return_assistant_tokens_mask=
True)`` tells which tokens the assistant wrote (the tokens SFT trains on).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import random
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [BOS, EOS, PAD, *(f"<|{role}|>" for role in ROLES)]

# Role marker, newline, content; an assistant turn's content and eos are its generation.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

VOCAB_SIZE = 2048
SEQ_LEN = 128
BATCH = 8
MAX_POSITIONS = 512
CORPUS_CHARS = 1_200_000
HELDOUT_CHARS = 60_000

# Pure-Python or always-present modules whose public functions have docstrings to ask about.
CHAT_MODULES = (
    "base64", "bisect", "calendar", "colorsys", "copy", "csv", "difflib", "fnmatch",
    "fractions", "functools", "glob", "gzip", "heapq", "html", "inspect", "ipaddress",
    "json", "keyword", "linecache", "math", "mimetypes", "ntpath", "operator", "os",
    "pathlib", "pickle", "platform", "posixpath", "pprint", "quopri", "random", "re",
    "shlex", "shutil", "statistics", "string", "struct", "tarfile", "tempfile", "textwrap",
    "tokenize", "types", "urllib.parse", "uuid", "warnings", "zipfile", "zlib",
)  # fmt: skip
# Modules whose public functions live in a C module of another name.
HOME_ALIASES = {"os": ("posix",), "math": ("math",), "operator": ("_operator",)}
QUESTIONS = (
    "What does {name} do?",
    "Explain {name}.",
    "What is {name} for?",
    "Tell me what {name} does.",
    "In Python, what does {name} do?",
)
ANSWER_CHARS = 320
EVAL_EVERY = 10  # every 10th function (in a seeded order) is asked only in the eval file


def log(message: str) -> None:
    """One progress line."""
    print(f"[tiny-llama] {message}", flush=True)


# -- corpus ---------------------------------------------------------------------------------
def corpus_files(seed: int) -> tuple[list[Path], list[Path]]:
    """Stdlib source files in a seeded order: (training files, held-out files)."""
    from orchestrator.data.corpora import stdlib_sources

    files = stdlib_sources()
    random.Random(seed).shuffle(files)
    return files[20:], files[:20]


def read_text(files: list[Path], limit: int) -> list[str]:
    """Whole files as text documents until ``limit`` characters are read."""
    docs: list[str] = []
    total = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        docs.append(text[: limit - total])
        total += len(docs[-1])
        if total >= limit:
            break
    return docs


# -- tokenizer ------------------------------------------------------------------------------
def train_tokenizer(docs: list[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """A byte-level BPE tokenizer trained on ``docs``, as a PreTrainedTokenizerFast.

    Encoding plain text prepends the bos token (as LLaMA's tokenizers do); the chat template
    writes its own bos, and ``apply_chat_template`` adds no special tokens of its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[f"<|{role}|>" for role in ROLES],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def token_stream(tokenizer: Any, docs: list[str]) -> Any:
    """All documents as one token tensor, each ``bos text eos``."""
    import torch

    ids: list[int] = []
    # the backend directly: whole files are longer than model_max_length, on purpose
    for enc in tokenizer.backend_tokenizer.encode_batch(docs):  # bos from the post-processor
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# -- model ----------------------------------------------------------------------------------
def model_config(tokenizer: Any) -> Any:
    """The tiny LLaMA's config: 4 layers of width 64, the tokenizer's vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def heldout_loss(model: Any, stream: Any, seq_len: int = SEQ_LEN, windows: int = 16) -> float:
    """Mean next-token loss over the first ``windows`` windows of ``stream``."""
    import torch

    n = min(windows, (len(stream) - 1) // seq_len)
    batch = stream[: n * seq_len].view(n, seq_len)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(model(input_ids=batch, labels=batch).loss)
    model.train(was_training)
    return loss


def pretrain(model: Any, stream: Any, steps: int, seed: int, eval_stream: Any) -> list[float]:
    """A plain torch loop: random windows of ``stream``, AdamW, linear warmup then cosine.

    Returns the training loss of every step."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - SEQ_LEN, (BATCH,), generator=gen)
        batch = torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            recent = sum(losses[-10:]) / len(losses[-10:])
            log(
                f"step {step + 1}/{steps}  loss {recent:.3f}  "
                f"held-out {heldout_loss(model, eval_stream):.3f}  "
                f"({time.perf_counter() - started:.0f} s)"
            )
    model.eval()
    return losses


# -- chat data ------------------------------------------------------------------------------
def first_paragraph(doc: str | None) -> str | None:
    """The docstring's first paragraph on one line, cut at a sentence near ANSWER_CHARS;
    None when there is no usable prose (missing, a bare signature, too short)."""
    if not doc:
        return None
    para = " ".join(doc.strip().split("\n\n")[0].split())
    if len(para) < 24 or re.match(r"^[\w.]+\(.*\)( ->|$)", para) or para.startswith(">>>"):
        return None
    if len(para) > ANSWER_CHARS:
        cut = para.rfind(". ", 0, ANSWER_CHARS)
        if cut < 40:
            return None
        para = para[: cut + 1]
    return para


def documented_functions() -> Iterator[tuple[str, str]]:
    """``(qualified name, first docstring paragraph)`` of the public functions and classes
    of CHAT_MODULES, in a stable order, each object once."""
    seen: set[int] = set()
    for modname in CHAT_MODULES:
        module = importlib.import_module(modname)
        for name in sorted(vars(module)):
            obj = vars(module)[name]
            if name.startswith("_") or id(obj) in seen:
                continue
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            home = getattr(obj, "__module__", None) or modname
            if home not in (modname, f"_{modname}", *HOME_ALIASES.get(modname, ())):
                continue  # re-exported from elsewhere: asked about where it lives
            answer = first_paragraph(inspect.getdoc(obj))
            if answer is None:
                continue
            seen.add(id(obj))
            yield f"{modname}.{name}", answer


def chat_records(seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval) chat records, a pure function of ``seed`` (and the interpreter's stdlib).

    Each function is asked about once, in one of QUESTIONS' phrasings; every EVAL_EVERY-th
    function of a seeded order goes to eval only."""
    rng = random.Random(seed)
    functions = list(documented_functions())
    rng.shuffle(functions)
    train: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    for i, (name, answer) in enumerate(functions):
        question = rng.choice(QUESTIONS).format(name=name)
        record = {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }
        (held if i % EVAL_EVERY == 0 else train).append(record)
    return train, held


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """One JSON object a line, keys in a fixed order, UTF-8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")


def write_chat_data(data_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``stdlib_chat.jsonl`` and ``stdlib_chat_eval.jsonl`` into ``data_dir``."""
    train, held = chat_records(seed)
    train_path, eval_path = data_dir / "stdlib_chat.jsonl", data_dir / "stdlib_chat_eval.jsonl"
    write_jsonl(train_path, train)
    write_jsonl(eval_path, held)
    log(f"chat data: {len(train)} train, {len(held)} eval records -> {data_dir}")
    return train_path, eval_path


# -- all of it ------------------------------------------------------------------------------
def build_tiny_llama(out_dir: Path, steps: int = 300, seed: int = 0) -> Path:
    """Train the tokenizer, pretrain the model ``steps`` steps, write model and data.

    Returns ``out_dir``; the model directory is ``out_dir/model`` (load it with
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    model_dir, data_dir = out_dir / "model", out_dir / "data"
    started = time.perf_counter()
    torch.manual_seed(seed)

    train_files, heldout_files = corpus_files(seed)
    docs = read_text(train_files, CORPUS_CHARS)
    heldout = read_text(heldout_files, HELDOUT_CHARS)
    log(f"corpus: {len(docs)} stdlib files, {sum(map(len, docs)):,} characters")

    tokenizer = train_tokenizer(docs)
    stream = token_stream(tokenizer, docs)
    eval_stream = token_stream(tokenizer, heldout)
    log(
        f"tokenizer: BPE, {len(tokenizer)} tokens; corpus is {len(stream):,} tokens "
        f"({time.perf_counter() - started:.0f} s)"
    )

    model = LlamaForCausalLM(model_config(tokenizer))
    params = sum(p.numel() for p in model.parameters())
    at_init = heldout_loss(model, eval_stream)
    log(f"model: LLaMA, {params / 1e6:.2f} M parameters; held-out loss at init {at_init:.3f}")
    pretrain(model, stream, steps, seed, eval_stream)

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=64,
        do_sample=False,
        repetition_penalty=1.3,  # a model this small loops without it
    )
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "stdlib_heldout.txt").write_text("\n".join(heldout), encoding="utf-8")
    write_chat_data(data_dir, seed)
    log(f"model -> {model_dir} ({time.perf_counter() - started:.0f} s in all)")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """``python examples/tiny_llama.py --out examples/tiny-llama [--steps N] [--seed S]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "tiny-llama")
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_tiny_llama(args.out, steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
