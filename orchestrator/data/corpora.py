"""Training data: byte-level token corpora packed into sequences, and a resumable sample order.

The order is a pure function of (seed, position): sample ``k`` of the stream is
``perm_e[k mod n]`` with ``e = k // n`` and ``perm_e`` a seeded permutation, so
the only state to checkpoint is the stream position (``cursor``). Skipping data
after a rollback is moving the cursor.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.errors import UsageError
from orchestrator.factories import resolve_factory

if TYPE_CHECKING:
    from orchestrator.recipe.schema import DataConfig


def stdlib_sources() -> list[Path]:
    """The Python standard library's own ``.py`` files, in a stable order (tests excluded)."""
    return list(_stdlib_sources())


@functools.cache
def _stdlib_sources() -> tuple[Path, ...]:
    # The walk takes over a second and the standard library does not change under a running
    # process: one walk per process serves every build_data call (tests build dozens).
    root = Path(sysconfig.get_paths()["stdlib"])
    return tuple(
        sorted(p for p in root.rglob("*.py") if "test" not in p.relative_to(root).parts[0].lower())
    )


def read_bytes(paths: list[Path], limit: int) -> bytes:
    """Concatenate files (as raw bytes) up to ``limit`` bytes."""
    chunks: list[bytes] = []
    total = 0
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"data.paths: cannot read '{path}': {exc.strerror}") from None
        chunks.append(data[: limit - total])
        total += len(chunks[-1])
        if total >= limit:
            break
    return b"".join(chunks)


@dataclass
class TokenDataset:
    """Fixed-length token sequences cut from one long token stream."""

    tokens: torch.Tensor
    seq_len: int
    fingerprint: str

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.tokens[i * self.seq_len : (i + 1) * self.seq_len].long()
        return {"input_ids": ids, "labels": ids}


@dataclass
class Split:
    """A train and an eval dataset cut from the same corpus, plus its identity for audits."""

    train: Any
    eval: Any
    fingerprint: str
    description: str


def build_data(cfg: DataConfig, tokenizer_path: str | None = None) -> Split:
    """Train/eval datasets for a recipe's data section; ``kind: dataset`` tokenizes with
    the tokenizer at ``tokenizer_path`` (the recipe's ``model.tokenizer_path``)."""
    if cfg.kind == "dataset":
        from orchestrator.data.tokenized import build_tokenized

        return build_tokenized(cfg, tokenizer_path)
    if cfg.kind == "digits":
        return build_digits(cfg.eval_fraction)
    if cfg.kind == "factory":
        made = resolve_factory(cfg.factory or "", "data.factory")(
            seq_len=cfg.seq_len, **cfg.factory_args
        )
        train, evalset = made if isinstance(made, tuple) else (made, None)
        return Split(
            train, evalset, fingerprint=f"factory:{cfg.factory}", description=str(cfg.factory)
        )
    paths = stdlib_sources() if cfg.kind == "stdlib_bytes" else [Path(p) for p in cfg.paths]
    raw = read_bytes(paths, cfg.max_bytes)
    if len(raw) < 2 * (cfg.seq_len + 1):
        raise UsageError(f"data: only {len(raw)} bytes of text, too few for seq_len {cfg.seq_len}")
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    n_eval_tokens = int(len(tokens) * cfg.eval_fraction)
    split_at = len(tokens) - n_eval_tokens
    fingerprint = hashlib.sha256(raw).hexdigest()
    train = TokenDataset(tokens[:split_at], cfg.seq_len, fingerprint)
    evalset = (
        TokenDataset(tokens[split_at:], cfg.seq_len, fingerprint)
        if n_eval_tokens > cfg.seq_len
        else None
    )
    desc = f"{cfg.kind}: {len(paths)} files, {len(raw)} bytes"
    return Split(train, evalset, fingerprint, desc)


DIGITS_SPLIT_SEED = 0  # the train/eval split is fixed, whatever the recipe's seed


@dataclass
class TensorDataset:
    """Labelled images: sample ``i`` is ``{"pixel_values": images[i], "labels": labels[i]}``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def build_digits(eval_fraction: float) -> Split:
    """scikit-learn's 8x8 digits (ships with the package): a fixed seeded split, normalised
    with the train split's mean and std, images ``1 x 8 x 8`` (MLPs flatten them)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("data.kind digits needs scikit-learn: pip install scikit-learn") from None
    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(raw.target, dtype=torch.long)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_eval = int(len(labels) * eval_fraction)
    train_idx, eval_idx = perm[n_eval:], perm[:n_eval]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    ident = raw.images.tobytes() + raw.target.tobytes() + f"eval={n_eval}".encode()
    fingerprint = hashlib.sha256(ident).hexdigest()
    train = TensorDataset(images[train_idx], labels[train_idx])
    evalset = TensorDataset(images[eval_idx], labels[eval_idx]) if n_eval else None
    desc = f"digits: {len(train_idx)} train / {n_eval} eval images, 1x8x8, 10 classes"
    return Split(train, evalset, fingerprint, desc)


class SampleOrder:
    """Deterministic, seeded, endless order over ``n`` samples; position is the only state."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def index(self, k: int) -> int:
        """Dataset index of the ``k``-th sample of the stream."""
        epoch, offset = divmod(k, self.n)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=gen)
            self._epoch = epoch
        return int(self._perm[offset])


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of sample dicts into one batch dict."""
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


class BatchSource:
    """Micro-batches for one rank at a given stream position.

    At cursor ``c``, micro-batch ``m`` of rank ``r`` holds stream samples
    ``c + (m * world + r) * B ... + B - 1``; one optimizer step consumes
    ``B * grad_accumulation * world`` samples.
    """

    def __init__(self, dataset: Any, seed: int, micro_batch: int, rank: int, world_size: int):
        self.dataset = dataset
        self.order = SampleOrder(len(dataset), seed)
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size

    def micro_batch_at(self, cursor: int, micro: int) -> dict[str, torch.Tensor]:
        """The ``micro``-th micro-batch of this rank for the step starting at ``cursor``."""
        start = cursor + (micro * self.world_size + self.rank) * self.micro_batch
        return collate([self.dataset[self.order.index(start + j)] for j in range(self.micro_batch)])

    def sample_range(self, cursor: int, steps: int, grad_accumulation: int) -> tuple[int, int]:
        """Stream positions [start, end) consumed by ``steps`` steps from ``cursor``."""
        return cursor, cursor + steps * grad_accumulation * self.world_size * self.micro_batch
