"""Training data: corpora, users' datasets (``kind: dataset``: tokenizers, record formats,
packing, the tokenized cache; docs/DATA.md), the resumable sample order, batches (below the
techniques, which may shape the data, and the engine, which draws from it)."""

from orchestrator.data.corpora import (
    BatchSource,
    SampleOrder,
    Split,
    TokenDataset,
    build_data,
    build_digits,
    collate,
)

__all__ = [
    "BatchSource",
    "SampleOrder",
    "Split",
    "TokenDataset",
    "build_data",
    "build_digits",
    "collate",
]
