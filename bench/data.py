"""`data.kind: dataset`: tokenization throughput, the cache, the pipeline's share of a step,
and peak memory on a corpus several times larger than a memory cap.

Four measurements, each against its baseline in the same run:

* **throughput**: a first build (tokenize + pack + write the cache) of a JSONL text corpus
  and of a chat corpus (chat template, assistant masks), in MB/s and tokens/s;
* **cache**: the second build of the same data section (what a second run, a resume or a
  rollback does) against the first, wall time and ratio;
* **step share**: drawing one step's micro-batch through ``BatchSource`` (the loop's path)
  against one optimizer step of a small LLaMA (forward, backward, AdamW) on the same
  batch; the share is data / (data + step) (target <= 2 %);
* **memory**: in a fresh process, the peak RSS growth of a first build of a text corpus
  ``--corpus-mb`` large, against ``--cap-mb`` (the corpus is several times the cap), and
  of a build of a corpus a quarter that size: flat memory means both stay under the cap.

Prints a table and one JSON line.

    python bench/data.py [--corpus-mb 160] [--cap-mb 40] [--chat-records 4000] [--text-mb 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
STEP_SHARE_TARGET = 0.02

from text_kit import build_tokenizer, chat_records, docstrings, write_jsonl


def write_text_corpus(path: Path, megabytes: float) -> Path:
    """A JSONL text corpus of about ``megabytes``, one docstring a record, written in a stream."""
    docs = [json.dumps({"text": d}) + "\n" for d in docstrings()]
    target = int(megabytes * 1e6)
    written = 0
    with path.open("w") as out:
        while written < target:
            for line in docs:
                out.write(line)
                written += len(line)
    return path


def data_cfg(paths: list[Path], cache: Path, **kw: object) -> object:
    from orchestrator.recipe.schema import DataConfig

    return DataConfig(kind="dataset", paths=[str(p) for p in paths], cache_dir=str(cache), **kw)  # type: ignore[arg-type]


def timed_build(cfg: object, tok: Path) -> tuple[float, object]:
    from orchestrator.data import build_data

    start = time.perf_counter()
    split = build_data(cfg, str(tok))  # type: ignore[arg-type]
    return time.perf_counter() - start, split


def step_share(split: object, seq_len: int, micro_batch: int) -> dict[str, float]:
    """Median data time of a step's micro-batch against a small LLaMA's step."""
    import torch
    import transformers

    from orchestrator.data import BatchSource
    from orchestrator.engine.tasks import CausalLM

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=seq_len,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    source = BatchSource(split.train, seed=0, micro_batch=micro_batch, rank=0, world_size=1)  # type: ignore[attr-defined]
    task = CausalLM()
    data_s, step_s = [], []
    for k in range(12):
        t0 = time.perf_counter()
        batch = source.micro_batch_at(k * micro_batch, 0)
        t1 = time.perf_counter()
        task.loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if k >= 2:  # warm-up steps out
            data_s.append(t1 - t0)
            step_s.append(t2 - t1)
    data, step = sorted(data_s)[len(data_s) // 2], sorted(step_s)[len(step_s) // 2]
    return {"data_ms": data * 1e3, "step_ms": step * 1e3, "share": data / (data + step)}


_CHILD = """
import json, sys, threading, time
sys.path[:0] = [{repo!r}, {tests!r}]
from orchestrator.data import build_data
from orchestrator.data.tokenizers import load_tokenizer
from orchestrator.recipe.schema import DataConfig
import datasets, transformers  # everything a build imports, before the baseline

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
load_tokenizer({tok!r})
build_data(DataConfig(kind="dataset", paths=[{warm!r}], cache_dir={cache!r} + "-warm"), {tok!r})
base_rss, base_anon = status("VmRSS"), status("RssAnon")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
peak_anon = [base_anon]
done = threading.Event()
def sample():
    while not done.wait(0.005):
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
threading.Thread(target=sample, daemon=True).start()
cfg = DataConfig(kind="dataset", paths=[{path!r}], cache_dir={cache!r}, seq_len=512)
split = build_data(cfg, {tok!r})
n = len(split.train)
for i in range(0, n, max(1, n // 2000)):
    split.train[i]
done.set()
print(json.dumps({{"base_mb": base_rss, "peak_mb": status("VmHWM"),
                   "anon_growth_mb": peak_anon[0] - base_anon, "samples": n}}))
"""


def peak_rss(tok: Path, path: Path, cache: Path) -> dict[str, float]:
    """A first build (and a pass over the samples) in a fresh process warmed by a tiny build
    (imports, first calls): heap and RSS before it, and their peaks during it."""
    warm = write_text_corpus(path.with_name("warm.jsonl"), 0.05)  # lazy imports, first calls
    code = _CHILD.format(
        repo=str(REPO), tests=str(REPO / "tests"), tok=str(tok), path=str(path),
        cache=str(cache), warm=str(warm),
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run the four measurements; print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=float, default=160.0)
    parser.add_argument("--cap-mb", type=float, default=40.0)
    parser.add_argument("--chat-records", type=int, default=4000)
    parser.add_argument("--text-mb", type=float, default=16.0)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="regimen-bench-data-") as tmp:
        root = Path(tmp)
        tok = build_tokenizer(root / "tok", vocab=512)

        text = write_text_corpus(root / "text.jsonl", args.text_mb)
        cfg = data_cfg([text], root / "cache", seq_len=512)
        first, split = timed_build(cfg, tok)
        second, _ = timed_build(cfg, tok)
        tokens = split.train.tokens() + (split.eval.tokens() if split.eval else 0)  # type: ignore[attr-defined]
        out["text"] = {
            "mb": args.text_mb, "first_s": first, "second_s": second,
            "mb_per_s": args.text_mb / first, "tokens_per_s": tokens / first,
            "cache_speedup": first / second,
        }  # fmt: skip

        chat = write_jsonl(root / "chat.jsonl", chat_records(args.chat_records))
        chat_mb = chat.stat().st_size / 1e6
        ccfg = data_cfg([chat], root / "cache", format="chat", seq_len=512)
        cfirst, csplit = timed_build(ccfg, tok)
        csecond, _ = timed_build(ccfg, tok)
        ctokens = csplit.train.tokens() + (csplit.eval.tokens() if csplit.eval else 0)  # type: ignore[attr-defined]
        out["chat"] = {
            "records": args.chat_records, "mb": chat_mb, "first_s": cfirst, "second_s": csecond,
            "records_per_s": args.chat_records / cfirst, "tokens_per_s": ctokens / cfirst,
            "cache_speedup": cfirst / csecond,
        }  # fmt: skip

        out["step"] = step_share(split, seq_len=512, micro_batch=8)

        big = write_text_corpus(root / "big.jsonl", args.corpus_mb)
        small = write_text_corpus(root / "small.jsonl", args.corpus_mb / 4)
        mem_small = peak_rss(tok, small, root / "cache-mem")
        mem_big = peak_rss(tok, big, root / "cache-mem")
        out["memory"] = {
            "cap_mb": args.cap_mb, "corpus_mb": args.corpus_mb,
            "corpus_over_cap": args.corpus_mb / args.cap_mb,
            "growth_small_mb": mem_small["anon_growth_mb"],
            "growth_big_mb": mem_big["anon_growth_mb"],
            "rss_growth_small_mb": mem_small["peak_mb"] - mem_small["base_mb"],
            "rss_growth_big_mb": mem_big["peak_mb"] - mem_big["base_mb"],
            "base_mb": mem_big["base_mb"], "samples_big": mem_big["samples"],
        }  # fmt: skip
    t, c, s, m = out["text"], out["chat"], out["step"], out["memory"]  # type: ignore[misc]
    print(f"text  {t['mb']:.0f} MB: first build {t['first_s']:.2f} s ({t['mb_per_s']:.2f} MB/s, "
          f"{t['tokens_per_s']:,.0f} tok/s); cached {t['second_s'] * 1e3:.1f} ms "
          f"(x{t['cache_speedup']:,.0f} faster)")  # fmt: skip
    print(f"chat  {c['records']} records ({c['mb']:.1f} MB): first build {c['first_s']:.2f} s "
          f"({c['records_per_s']:,.0f} records/s, {c['tokens_per_s']:,.0f} tok/s); cached "
          f"{c['second_s'] * 1e3:.1f} ms (x{c['cache_speedup']:,.0f} faster)")  # fmt: skip
    print(f"step  data {s['data_ms']:.2f} ms vs step {s['step_ms']:.0f} ms: share "
          f"{s['share']:.2%} (target <= {STEP_SHARE_TARGET:.0%})")  # fmt: skip
    print(f"mem   corpus {m['corpus_mb']:.0f} MB = {m['corpus_over_cap']:.0f}x the "
          f"{m['cap_mb']:.0f} MB cap: peak heap (RssAnon) growth {m['growth_big_mb']:.1f} MB "
          f"(a quarter-size corpus: "
          f"{m['growth_small_mb']:.1f} MB) over {m['base_mb']:.0f} MB RSS after imports, "
          f"{'under' if m['growth_big_mb'] <= m['cap_mb'] else 'OVER'} the cap; peak RSS with "
          f"file pages (reclaimable) +{m['rss_growth_big_mb']:.1f} MB "
          f"(+{m['rss_growth_small_mb']:.1f} MB)")  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
