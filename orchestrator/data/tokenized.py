"""`data.kind: dataset`: users' records tokenized once into a fingerprinted on-disk cache of
flat token arrays (numpy memmaps), served as fixed-length samples.

A cache entry holds, per split, four flat files: token ids, labels (-100 where no loss),
position ids (restarting at every document) and the ``[start, end)`` token range of each
sample. Building streams the records (Arrow, memory-mapped) through the tokenizer in
batches and appends to those files, so memory stays flat whatever the corpus size; reading
memory-maps them. The entry's directory name is a fingerprint of everything the tokens
depend on; a second run, a resume or a rollback finds it and tokenizes nothing.

Packing (``packing: true``) is first fit over a few open samples: each document goes into the
first open sample with room for it (in record order), and when none has room and all are in
use the fullest is written; a document longer than ``seq_len`` is cut into ``seq_len``
chunks, each its own document. Each document's first label is -100, so no
loss spans a boundary, and its position ids start at 0, from which Hugging Face models build
a block-diagonal causal mask (no attention across documents; see docs/DATA.md). A sample's
unused tail is padding with its own positions and labels -100. ``packing: false`` gives one
document per sample, truncated to ``seq_len``, right-padded, with an ``attention_mask``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from orchestrator.data.corpora import Split
from orchestrator.data.formats import Encoded, encode_texts, encoder
from orchestrator.data.sources import files_fingerprint, load_records, resolve_paths
from orchestrator.data.tokenizers import load_tokenizer, tokenizer_fingerprint
from orchestrator.errors import UsageError

if TYPE_CHECKING:
    from orchestrator.recipe.schema import DataConfig

log = logging.getLogger("orchestrator.data")

CACHE_VERSION = 1  # bump when the layout or the encoding changes
IGNORE = -100
_FLUSH_TOKENS = 1 << 18  # tokens buffered in memory before an append to the flat files
_RECORD_BATCH = 512
_OPEN_SAMPLES = 16  # packing: samples kept open for first fit (16 x seq_len tokens in memory)
_ARRAYS = {"ids": np.int32, "labels": np.int32, "pos": np.int32}


# -- writing -------------------------------------------------------------------------------
class _SplitWriter:
    """Appends documents to one split's flat files and closes samples as they fill.

    Buffers hold numpy arrays (4 bytes a token), flushed every ``_FLUSH_TOKENS``."""

    def __init__(self, folder: Path, name: str, seq_len: int, packing: bool):
        self.folder, self.name, self.seq_len, self.packing = folder, name, seq_len, packing
        self.files = {k: open(folder / f"{name}.{k}.bin", "wb") for k in _ARRAYS}  # noqa: SIM115
        self.samples = open(folder / f"{name}.samples.bin", "wb")  # noqa: SIM115
        self.buf: dict[str, list[np.ndarray]] = {k: [] for k in _ARRAYS}
        self.buffered = 0
        self.sample_buf: list[int] = []
        self.written = 0  # tokens appended so far (flushed or buffered)
        self.open_start = 0  # first token of the sample being filled
        self.documents = 0
        self.dropped = 0
        self.bins: list[list[tuple[np.ndarray, np.ndarray]]] = []  # open samples (packing)
        self.bin_used: list[int] = []

    def _append(self, ids: np.ndarray, labels: np.ndarray) -> None:
        self.buf["ids"].append(ids)
        self.buf["labels"].append(labels)
        self.buf["pos"].append(np.arange(len(ids), dtype=np.int32))
        self.written += len(ids)
        self.buffered += len(ids)
        if self.buffered >= _FLUSH_TOKENS:
            self._flush()

    def _close_sample(self) -> None:
        if self.written > self.open_start:
            self.sample_buf += [self.open_start, self.written]
        self.open_start = self.written

    def add(self, ids: list[int], mask: list[bool]) -> None:
        """One document: its ids and which of them are targets."""
        tokens = np.asarray(ids, dtype=np.int32)
        labels = np.where(np.asarray(mask, dtype=bool), tokens, np.int32(IGNORE)).astype(np.int32)
        step = self.seq_len
        starts = range(0, len(tokens), step) if self.packing else range(min(1, len(tokens)))
        for i in starts:  # packing: seq_len chunks; else one sample, truncated to seq_len
            chunk_ids, chunk_labels = tokens[i : i + step], labels[i : i + step].copy()
            chunk_labels[0] = IGNORE  # nothing predicts across a boundary
            if not (chunk_labels != IGNORE).any():
                self.dropped += 1  # no target: it would add nothing but a NaN-prone sample
                continue
            self.documents += 1
            if self.packing:
                self._place(chunk_ids, chunk_labels)
            else:
                self._append(chunk_ids, chunk_labels)
                self._close_sample()

    def _place(self, ids: np.ndarray, labels: np.ndarray) -> None:
        """First fit over the open samples; when none has room and ``_OPEN_SAMPLES`` are
        open, the fullest is written out."""
        for k, used in enumerate(self.bin_used):
            if used + len(ids) <= self.seq_len:
                self.bins[k].append((ids, labels))
                self.bin_used[k] += len(ids)
                if self.bin_used[k] == self.seq_len:
                    self._write_bin(k)
                return
        if len(self.bins) >= _OPEN_SAMPLES:
            self._write_bin(max(range(len(self.bins)), key=self.bin_used.__getitem__))
        self.bins.append([(ids, labels)])
        self.bin_used.append(len(ids))

    def _write_bin(self, k: int) -> None:
        for ids, labels in self.bins.pop(k):
            self._append(ids, labels)
        self.bin_used.pop(k)
        self._close_sample()

    def _flush(self) -> None:
        for key, dtype in _ARRAYS.items():
            if self.buf[key]:
                self.files[key].write(np.concatenate(self.buf[key]).astype(dtype).tobytes())
            self.buf[key] = []
        self.buffered = 0
        self.samples.write(np.asarray(self.sample_buf, dtype=np.int64).tobytes())
        self.sample_buf = []

    def finish(self) -> dict[str, int]:
        """Write the open samples, close the files; the split's counts."""
        while self.bins:
            self._write_bin(0)
        self._close_sample()
        self._flush()
        for f in (*self.files.values(), self.samples):
            f.close()
        n = os.path.getsize(self.folder / f"{self.name}.samples.bin") // 16
        return {
            "samples": n,
            "tokens": self.written,
            "documents": self.documents,
            "dropped": self.dropped,
        }


def is_eval_record(index: int, fraction: float) -> bool:
    """Record ``index`` goes to eval: evenly spaced, ``floor(n * fraction)`` of ``n``
    records, with no state (no permutation of the whole corpus in memory)."""
    return fraction > 0 and int((index + 1) * fraction) > int(index * fraction)


def _encoded_batches(records: Any, cfg: DataConfig, tokenizer: Any) -> Iterator[list[Encoded]]:
    """Every record encoded, a batch at a time (format text tokenizes the batch at once)."""
    encode = encoder(cfg.format, cfg.text_field, cfg.train_on_prompt)
    index = 0
    for batch in records.iter(batch_size=_RECORD_BATCH):
        columns = list(batch)
        values = zip(*batch.values(), strict=True)
        rows = [dict(zip(columns, row, strict=True)) for row in values]
        if cfg.format == "text" and rows:
            if cfg.text_field not in columns:
                raise UsageError(
                    f"data.text_field: the records have no '{cfg.text_field}' field (they "
                    f"have: {', '.join(columns)}): set data.text_field"
                )
            yield encode_texts(tokenizer, [str(r[cfg.text_field] or "") for r in rows])
        else:
            yield [encode(tokenizer, row, index + k) for k, row in enumerate(rows)]
        index += len(rows)


def tokenize_records(
    records: Any,
    cfg: DataConfig,
    tokenizer: Any,
    folder: Path,
    splits: tuple[str, ...],
    eval_fraction: float = 0.0,
) -> dict[str, dict[str, int]]:
    """Tokenize ``records`` into ``folder``: one split, or ``("train", "eval")`` with
    ``eval_fraction`` of the records held out."""
    writers = {name: _SplitWriter(folder, name, cfg.seq_len, cfg.packing) for name in splits}
    index = 0
    for encoded in _encoded_batches(records, cfg, tokenizer):
        for ids, mask in encoded:
            held_out = len(splits) == 2 and is_eval_record(index, eval_fraction)
            writers[splits[-1] if held_out else splits[0]].add(ids, mask)
            index += 1
    return {name: w.finish() for name, w in writers.items()}


# -- reading -------------------------------------------------------------------------------
class TokenizedDataset:
    """Fixed-length samples of one split of a cache entry; ``len()`` and ``[i]`` (tensors)."""

    def __init__(self, folder: Path, name: str, seq_len: int, packing: bool, pad_id: int):
        self.folder, self.name = folder, name
        self.seq_len, self.packing, self.pad_id = seq_len, packing, pad_id
        self._arrays = {k: self._map(k, dtype) for k, dtype in _ARRAYS.items()}
        self._samples = self._map("samples", np.int64).reshape(-1, 2)

    def _map(self, key: str, dtype: Any) -> np.ndarray:
        path = self.folder / f"{self.name}.{key}.bin"
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start, end = (int(v) for v in self._samples[i])
        n = end - start
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE, dtype=np.int64)
        ids[:n] = self._arrays["ids"][start:end]
        labels[:n] = self._arrays["labels"][start:end]
        out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if self.packing:
            pos = np.empty(self.seq_len, dtype=np.int64)
            pos[:n] = self._arrays["pos"][start:end]
            pos[n:] = np.arange(self.seq_len - n)  # the padding is a document of its own
            out["position_ids"] = torch.from_numpy(pos)
        else:
            mask = np.zeros(self.seq_len, dtype=np.int64)
            mask[:n] = 1
            out["attention_mask"] = torch.from_numpy(mask)
        return out

    def tokens(self) -> int:
        """Tokens in this split (padding excluded)."""
        return len(self._arrays["ids"])


# -- the cache -----------------------------------------------------------------------------
def fingerprint(cfg: DataConfig, tokenizer_path: str) -> str:
    """Identity of the tokenized data: files (path, size, mtime), tokenizer files, format
    and every setting the tokens depend on."""
    parts = {
        "version": CACHE_VERSION,
        "files": files_fingerprint(resolve_paths(cfg.paths)),
        "eval_files": files_fingerprint(resolve_paths(cfg.eval_paths, "data.eval_paths"))
        if cfg.eval_paths
        else None,
        "eval_fraction": None if cfg.eval_paths else cfg.eval_fraction,
        "tokenizer": tokenizer_fingerprint(tokenizer_path),
        "format": cfg.format,
        "text_field": cfg.text_field if cfg.format == "text" else None,
        "seq_len": cfg.seq_len,
        "packing": cfg.packing,
        "train_on_prompt": cfg.train_on_prompt,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (ranks of one node build an entry once)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_entry(cfg: DataConfig, tokenizer_path: str, folder: Path, root: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_path)
    arrow = root / "arrow"
    records = load_records(resolve_paths(cfg.paths), arrow)
    if cfg.eval_paths:
        counts = tokenize_records(records, cfg, tokenizer, folder, ("train",))
        held = load_records(
            resolve_paths(cfg.eval_paths, "data.eval_paths"), arrow, "data.eval_paths"
        )
        counts.update(tokenize_records(held, cfg, tokenizer, folder, ("eval",)))
    else:
        counts = tokenize_records(
            records, cfg, tokenizer, folder, ("train", "eval"), cfg.eval_fraction
        )
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    meta = {"version": CACHE_VERSION, "pad_id": int(pad), "records": len(records), **counts}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def prepare(cfg: DataConfig, tokenizer_path: str) -> tuple[Path, dict[str, Any], bool]:
    """The cache entry for ``cfg`` (built when missing): its folder, its meta and whether it
    was found (True) or built now (False)."""
    root = Path(cfg.cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg, tokenizer_path)
    folder = root / fp[:32]
    with _locked(root / f"{fp[:32]}.lock"):
        if (folder / "meta.json").exists():
            log.info("data cache hit: %s", folder)
            return folder, json.loads((folder / "meta.json").read_text()), True
        log.info("data cache miss: tokenizing into %s", folder)
        tmp = root / f".tmp-{fp[:32]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _build_entry(cfg, tokenizer_path, tmp, root)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder, json.loads((folder / "meta.json").read_text()), False


def build_tokenized(cfg: DataConfig, tokenizer_path: str | None) -> Split:
    """Train/eval datasets of a `kind: dataset` data section, from the cache."""
    if tokenizer_path is None:
        raise UsageError(
            "model.tokenizer: data.kind dataset needs a tokenizer: set model.tokenizer to a "
            "local tokenizer directory (or use model.kind hf_pretrained, whose path is used)"
        )
    folder, meta, _ = prepare(cfg, tokenizer_path)
    pad = int(meta["pad_id"])

    def split(name: str) -> TokenizedDataset:
        return TokenizedDataset(folder, name, cfg.seq_len, cfg.packing, pad)

    train = split("train")
    if len(train) == 0:
        raise UsageError(
            f"data.paths: no sample with a loss target in {cfg.paths} ({meta['records']} "
            "records): check data.format and the records' fields"
        )
    evalset = split("eval") if meta.get("eval", {}).get("samples") else None
    desc = (
        f"dataset ({cfg.format}): {meta['records']} records, {meta['train']['samples']} "
        f"train samples of {cfg.seq_len} tokens"
        + (f", {meta['eval']['samples']} eval" if evalset is not None else "")
        + (", packed" if cfg.packing else ", padded")
    )
    return Split(train, evalset, fingerprint=folder.name, description=desc)
