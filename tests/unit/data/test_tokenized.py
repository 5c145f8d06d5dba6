"""`data.kind: dataset`: users' files tokenized once, packed without loss or attention across
documents, padded per sample on request, split for eval, served by the usual BatchSource."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from text_kit import chat_records, docstrings, write_jsonl

from orchestrator.data import BatchSource, build_data
from orchestrator.data import tokenized as tokenized_mod
from orchestrator.data.tokenized import IGNORE, TokenizedDataset, is_eval_record
from orchestrator.errors import UsageError
from orchestrator.recipe.schema import DataConfig


def dataset_cfg(tmp_path: Path, paths: list[str], **kw) -> DataConfig:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("eval_fraction", 0.0)
    return DataConfig(kind="dataset", paths=paths, **kw)


def documents(sample: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) of each document of a packed sample (positions restart at 0)."""
    starts = (sample["position_ids"] == 0).nonzero().flatten().tolist()
    return list(zip(starts, [*starts[1:], len(sample["position_ids"])], strict=True))


def test_a_packed_chat_batch_has_loss_on_assistant_turns_only(tmp_path, tokenizer, tokenizer_dir):
    """The must-show: decode every token that carries loss in a packed chat batch."""
    records = chat_records(12)
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    cfg = dataset_cfg(tmp_path, [str(path)], format="chat", seq_len=256)
    split = build_data(cfg, str(tokenizer_dir))
    batch = BatchSource(split.train, seed=0, micro_batch=4, rank=0, world_size=1).micro_batch_at(
        0, 0
    )
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assistant_texts = {
        m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"
    }
    user_texts = {m["content"] for r in records for m in r["messages"] if m["role"] != "assistant"}
    packed_docs = 0
    for row in range(4):
        sample = {k: v[row] for k, v in batch.items()}
        docs = documents(sample)
        packed_docs += len(docs)
        for start, end in docs:
            ids, labels = sample["input_ids"][start:end], sample["labels"][start:end]
            assert labels[0] == IGNORE  # no loss predicting a document from the one before
            targets = labels != IGNORE
            assert torch.equal(labels[targets], ids[targets])  # a target is the token itself
            if not targets.any():
                assert set(ids.tolist()) == {tokenizer.pad_token_id}  # only the padding tail
                continue
            # Each run of consecutive targets decodes to one assistant turn and its end marker.
            runs, current = [], []
            for tok, is_target in zip(ids.tolist(), targets.tolist(), strict=True):
                if is_target:
                    current.append(tok)
                elif current:
                    runs.append(current)
                    current = []
            if current:
                runs.append(current)
            for run in runs:
                text = tokenizer.decode(run)
                assert text.endswith("<|im_end|>\n"), text
                assert text.removesuffix("<|im_end|>\n") in assistant_texts, text
            prompt = tokenizer.decode(ids[~targets].tolist())
            assert any(u in prompt for u in user_texts) and "<|im_start|>assistant" in prompt
    assert packed_docs > 4  # several documents share a sample


def test_packed_documents_do_not_attend_to_each_other(tmp_path, tokenizer_dir):
    """A packed sample's logits for its second document equal that document run alone."""
    import transformers

    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d[:80]} for d in docstrings()[:6]])
    split = build_data(dataset_cfg(tmp_path, [str(path)], seq_len=128), str(tokenizer_dir))
    sample = next(
        split.train[i] for i in range(len(split.train)) if len(documents(split.train[i])) > 2
    )
    _, (b0, b1) = documents(sample)[:2]
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    from orchestrator.engine.tasks import CausalLM

    seen: dict[str, torch.Tensor] = {}

    def keep_logits(module, args, kwargs, out) -> None:
        seen.setdefault("logits", out.logits)

    model.register_forward_hook(keep_logits, with_kwargs=True)
    CausalLM().loss(model, {k: v.unsqueeze(0) for k, v in sample.items()})
    alone = model(input_ids=sample["input_ids"][b0:b1].unsqueeze(0)).logits
    assert torch.allclose(seen["logits"][0, b0:b1], alone[0], atol=1e-5)
    # Without the loss's use_cache=False the documents would see each other.
    joined = model(**{k: v.unsqueeze(0) for k, v in sample.items()}).logits
    assert not torch.allclose(joined[0, b0:b1], alone[0], atol=1e-3)


def test_unpacked_samples_are_padded_with_an_attention_mask(tmp_path, tokenizer, tokenizer_dir):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Q: two?", "completion": " 2"}] * 3)
    cfg = dataset_cfg(tmp_path, [str(path)], format="completion", seq_len=24, packing=False)
    sample = build_data(cfg, str(tokenizer_dir)).train[0]
    assert set(sample) == {"input_ids", "labels", "attention_mask"}
    n = int(sample["attention_mask"].sum())
    assert tokenizer.decode(sample["input_ids"][:n]) == "Q: two? 2</s>"
    assert (sample["input_ids"][n:] == tokenizer.pad_token_id).all()
    assert (sample["labels"][n:] == IGNORE).all()
    assert tokenizer.decode(sample["labels"][sample["labels"] != IGNORE]) == " 2</s>"


def test_long_documents_are_cut_into_seq_len_chunks_without_cross_chunk_loss(
    tmp_path, tokenizer_dir
):
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(docstrings()[:20])}])
    split = build_data(dataset_cfg(tmp_path, [str(path)], seq_len=32), str(tokenizer_dir))
    assert len(split.train) > 3
    for i in range(len(split.train)):
        sample = split.train[i]
        assert sample["position_ids"][0] == 0 and sample["labels"][0] == IGNORE


def write_format(tmp_path: Path, kind: str, texts: list[str]) -> str:
    """The same records as a file (or directory) of one kind."""
    import datasets

    if kind == "jsonl":
        return str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts]))
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps([{"text": t} for t in texts]))
        return str(tmp_path / "d.json")
    if kind == "txt":  # one record a line; two files through a glob
        half = len(texts) // 2
        (tmp_path / "a.txt").write_text("\n".join(texts[:half]) + "\n")
        (tmp_path / "b.txt").write_text("\n".join(texts[half:]) + "\n")
        return str(tmp_path / "*.txt")
    table = datasets.Dataset.from_dict({"text": texts})
    if kind == "parquet":
        table.to_parquet(str(tmp_path / "d.parquet"))
        return str(tmp_path / "d.parquet")
    if kind == "csv":
        table.to_csv(str(tmp_path / "d.csv"), index=False)
        return str(tmp_path / "d.csv")
    table.save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "txt", "save_to_disk"])
def test_every_file_format_gives_the_same_tokens(tmp_path, tokenizer, tokenizer_dir, kind):
    texts = [d.splitlines()[0] for d in docstrings()[:10]]
    cfg = dataset_cfg(tmp_path, [write_format(tmp_path, kind, texts)], seq_len=64, packing=False)
    split = build_data(cfg, str(tokenizer_dir))
    decoded = []
    for i in range(len(split.train)):
        sample = split.train[i]
        decoded.append(tokenizer.decode(sample["input_ids"][sample["attention_mask"] == 1]))
    assert decoded == [tokenizer.decode(tokenizer(t)["input_ids"]) + "</s>" for t in texts]


def test_the_second_build_is_a_cache_hit_with_identical_samples(
    tmp_path, tokenizer_dir, monkeypatch, caplog
):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(20))
    cfg = dataset_cfg(tmp_path, [str(path)], format="chat", seq_len=96, eval_fraction=0.2)
    calls = []
    real = tokenized_mod.tokenize_records
    monkeypatch.setattr(
        tokenized_mod, "tokenize_records", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    first = build_data(cfg, str(tokenizer_dir))
    assert calls == [1]
    with caplog.at_level(logging.INFO, logger="orchestrator.data"):
        second = build_data(cfg, str(tokenizer_dir))
    assert calls == [1] and "data cache hit" in caplog.text  # nothing tokenized again
    assert second.fingerprint == first.fingerprint and len(second.train) == len(first.train)
    for i in range(len(first.train)):
        for key, value in first.train[i].items():
            assert torch.equal(value, second.train[i][key])
    # The tokens are memory-mapped files, not Python lists of the corpus.
    assert isinstance(second.train._arrays["ids"], np.memmap)
    # Another setting the tokens depend on is another entry; so is a changed file.
    build_data(cfg.model_copy(update={"seq_len": 64}), str(tokenizer_dir))
    path.write_text(path.read_text() + json.dumps(chat_records(21)[-1]) + "\n")
    changed = build_data(cfg, str(tokenizer_dir))
    assert calls == [1, 1, 1] and changed.fingerprint != first.fingerprint


def test_eval_fraction_holds_out_evenly_spaced_records(tmp_path, tokenizer, tokenizer_dir):
    assert sum(is_eval_record(i, 0.1) for i in range(1000)) == 100
    assert not any(is_eval_record(i, 0.0) for i in range(100))
    texts = [f"record number {i}" for i in range(40)]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    cfg = dataset_cfg(tmp_path, [str(path)], seq_len=32, packing=False, eval_fraction=0.25)
    split = build_data(cfg, str(tokenizer_dir))
    assert len(split.train) == 30 and len(split.eval) == 10

    def decoded(ds: TokenizedDataset) -> set[str]:
        return {
            tokenizer.decode(ds[i]["input_ids"][ds[i]["attention_mask"] == 1])
            for i in range(len(ds))
        }

    held, trained = decoded(split.eval), decoded(split.train)
    assert not held & trained and len(held | trained) == 40


def test_eval_paths_are_the_held_out_set(tmp_path, tokenizer, tokenizer_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"train {i}"} for i in range(8)])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"text": f"held {i}"} for i in range(3)])
    cfg = dataset_cfg(
        tmp_path, [str(train)], eval_paths=[str(held)], seq_len=16, packing=False, eval_fraction=0.5
    )
    split = build_data(cfg, str(tokenizer_dir))
    assert len(split.train) == 8 and len(split.eval) == 3
    assert tokenizer.decode(split.eval[0]["input_ids"][:3]).startswith("held")


def test_bad_paths_and_missing_tokenizer_are_usage_errors(tmp_path, tokenizer_dir):
    with pytest.raises(UsageError, match=r"data.paths: '.*nothing\*.jsonl' matches no file"):
        build_data(dataset_cfg(tmp_path, [str(tmp_path / "nothing*.jsonl")]), str(tokenizer_dir))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(UsageError, match="unknown file type '.xml'"):
        build_data(dataset_cfg(tmp_path, [str(tmp_path / "x.xml")]), str(tokenizer_dir))
    path = write_jsonl(tmp_path / "ok.jsonl", [{"text": "x"}])
    with pytest.raises(UsageError, match="model.tokenizer: data.kind dataset needs a tokenizer"):
        build_data(dataset_cfg(tmp_path, [str(path)]), None)
    with pytest.raises(UsageError, match="data.text_field: the records have no 'body' field"):
        build_data(dataset_cfg(tmp_path, [str(path)], text_field="body"), str(tokenizer_dir))


def test_first_fit_packing_fills_samples(tmp_path, tokenizer_dir):
    """Records of mixed lengths fill >= 90 % of the packed tokens (next fit left ~25 % empty)."""
    words = " ".join(docstrings()[:40]).split()
    texts = [" ".join(words[i : i + 5 + (i * 7) % 40]) for i in range(0, len(words) - 50, 13)]
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": t} for t in texts])
    split = build_data(dataset_cfg(tmp_path, [str(path)], seq_len=128), str(tokenizer_dir))
    fill = split.train.tokens() / (len(split.train) * 128)
    assert fill >= 0.9, fill
    assert sum(len(documents(split.train[i])) for i in range(len(split.train))) >= len(texts)


def test_ranks_building_at_once_tokenize_once(tmp_path, tokenizer_dir, monkeypatch):
    """Two ranks of a node reach an empty cache together: one builds, the other waits on the
    entry's lock and then reads it."""
    import threading

    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(30))
    cfg = dataset_cfg(tmp_path, [str(path)], format="chat", seq_len=128)
    calls = []
    real = tokenized_mod.tokenize_records

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenized_mod, "tokenize_records", counted)
    start = threading.Barrier(2)
    results: list = [None, None]

    def rank(r: int) -> None:
        start.wait()
        results[r] = build_data(cfg, str(tokenizer_dir))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert calls == [1] and results[0].fingerprint == results[1].fingerprint
    assert not list((tmp_path / "cache").glob(".tmp-*"))  # built aside, renamed into place
