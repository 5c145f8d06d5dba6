"""Users' data files as memory-mapped Arrow tables (the `datasets` library): local JSONL/JSON,
Parquet, CSV, plain text (one record a line, field ``text``) and ``save_to_disk`` directories."""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError

# File suffix -> the `datasets` builder that reads it.
BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
}

# Bytes read per chunk while converting to Arrow: the builders' 10 MiB default made the
# conversion's peak memory grow by ~3 MiB per MiB of JSON (docs/BENCHMARKS.md, bench/data.py).
_CHUNKS: dict[str, dict[str, int]] = {
    "json": {"chunksize": 1 << 20},
    "text": {"chunksize": 1 << 20},
}


def resolve_paths(patterns: list[str], key: str = "data.paths") -> list[Path]:
    """Files (globs expanded, sorted) or one ``save_to_disk`` directory; every pattern must
    match something readable, and all files one builder."""
    found: list[Path] = []
    for pattern in patterns:
        expanded = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else []
        if not matches and Path(expanded).exists():
            matches = [expanded]
        if not matches:
            raise UsageError(f"{key}: '{pattern}' matches no file: fix the path or the glob")
        found += [Path(m) for m in matches]
    dirs = [p for p in found if p.is_dir()]
    if dirs:
        if len(found) != 1:
            raise UsageError(
                f"{key}: '{dirs[0]}' is a directory: give exactly one save_to_disk directory, "
                "or files (globs) only"
            )
        return found
    builders = {builder_of(p, key) for p in found}
    if len(builders) > 1:
        raise UsageError(
            f"{key}: files of different kinds ({', '.join(sorted(builders))}): one kind per list"
        )
    return found


def builder_of(path: Path, key: str = "data.paths") -> str:
    """The `datasets` builder for a file, from its suffix."""
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UsageError(
            f"{key}: '{path}': unknown file type '{path.suffix}': use "
            f"{', '.join(BUILDERS)} or a save_to_disk directory"
        )
    return builder


def files_fingerprint(paths: list[Path]) -> str:
    """SHA-256 over each file's resolved path, size and mtime (every file of a directory)."""
    digest = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            st = file.stat()
            digest.update(f"{file.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_records(paths: list[Path], arrow_cache: Path, key: str = "data.paths") -> Any:
    """The records of ``paths`` as one memory-mapped ``datasets.Dataset``."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if len(paths) == 1 and paths[0].is_dir():
            loaded = datasets.load_from_disk(str(paths[0]))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise UsageError(
                        f"{key}: '{paths[0]}' holds splits {sorted(loaded)} and no 'train': "
                        "point at one split's directory"
                    )
                loaded = loaded["train"]
            return loaded
        builder = builder_of(paths[0], key)
        return datasets.load_dataset(
            builder,
            data_files=[str(p) for p in paths],
            split="train",
            cache_dir=str(arrow_cache),
            **_CHUNKS.get(builder, {}),
        )
    except UsageError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{key}: cannot read {paths[0]}: {first}") from None
    except Exception as exc:  # datasets' own errors (e.g. DatasetGenerationError)
        cause = exc.__cause__ or exc
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise UsageError(f"{key}: cannot read {paths[0]}: {first}") from None
