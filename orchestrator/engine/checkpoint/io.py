"""Durable files of a checkpoint: atomic writes, fsync, the SHA-256 manifest, write errors.

A checkpoint directory holds DeepSpeed's files, one ``regimen/rankNNNNN.pt`` per rank and a
``manifest.json`` written last: ``{format, step, world_size, created, meta, files: {relpath:
{sha256, bytes}}}``. This module hashes and fsyncs a directory's files, writes and reads that
manifest, checks a directory and its files against it and words the errors of a write that
failed.

The manifest is the whole checkpoint: every regular file under the directory (recursively,
``manifest.json`` aside) must be one of its entries and every entry must be a regular file
there (:func:`tree_problem`); a symbolic link anywhere, an unlisted file, a missing or renamed
one, or an entry whose name is absolute or holds ``..`` (:func:`name_problem`) makes the
checkpoint unloadable.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

# One copy of the atomic writes, in the run-directory module; re-exported for the package.
from orchestrator.rundir import atomic_write_bytes as atomic_write_bytes
from orchestrator.rundir import atomic_write_json as atomic_write_json
from orchestrator.rundir import fsync_dir as fsync_dir

FORMAT = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint: its step, its directory and its parsed manifest."""

    step: int
    path: Path
    manifest: dict


def sha256_file(path: Path) -> tuple[str, int]:
    """The file's SHA-256 hex digest and size in bytes; fsyncs it on the way."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
        os.fsync(f.fileno())
    return h.hexdigest(), n


def write_rank_state(rank_state: dict[str, Any], path: Path) -> None:
    """``torch.save`` one rank's state to ``path`` and fsync it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(rank_state, f)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(tmp: Path, step: int, world_size: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Hash (and fsync) every file under ``tmp``, fsync its dirs, then write the manifest last.

    Returns the manifest written to ``tmp / MANIFEST``.
    """
    files: dict[str, dict[str, Any]] = {}
    dirs = [tmp]
    for p in sorted(tmp.rglob("*")):
        if p.is_dir():
            dirs.append(p)
        elif p.name != MANIFEST:
            digest, size = sha256_file(p)  # also fsyncs the file
            files[p.relative_to(tmp).as_posix()] = {"sha256": digest, "bytes": size}
    for d in dirs:
        fsync_dir(d)
    manifest: dict[str, Any] = {"format": FORMAT, "step": step, "world_size": world_size}
    manifest |= {"created": time.time(), "meta": meta, "files": files}
    atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def read_manifest(path: Path, step: int) -> dict[str, Any] | None:
    """The manifest of checkpoint dir ``path`` if it is readable and matches ``step``, else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
    if ok and manifest.get("format") == FORMAT and manifest.get("step") == step:
        return manifest
    return None


def name_problem(rel: Any) -> str | None:
    """Why ``rel`` cannot name a file inside a checkpoint directory; None when it can.

    A name is a relative POSIX path of plain components: not absolute, no ``..``, ``.`` or
    empty component, no backslash or NUL, and not the manifest itself. Used for the local
    store and for what a remote manifest says, so a name never reaches outside its folder.
    """
    if not isinstance(rel, str) or not rel:
        return "is not a non-empty string"
    if "\\" in rel or "\0" in rel:
        return "holds a backslash or NUL character"
    if PurePosixPath(rel).is_absolute():
        return "is an absolute path"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "holds a '..', '.' or empty path component"
    if rel == MANIFEST:
        return "names the manifest itself"
    return None


def tree_problem(path: Path, files: dict[str, Any]) -> str | None:
    """What makes checkpoint dir ``path`` differ from the manifest's ``files``; None if nothing.

    Compares names and kinds only (no hashing): the directory must not be a symbolic link,
    every entry name must pass :func:`name_problem`, every regular file below ``path``
    (recursively, except the manifest) must be listed, every listed name must be a regular
    file, and nothing below may be a symbolic link or a special file.
    """
    if path.is_symlink():
        return f"{path} is a symbolic link (a checkpoint is a plain directory)"
    for rel in sorted(files):
        problem = name_problem(rel)
        if problem is not None:
            return f"its manifest entry {rel!r} {problem}"
    found: set[str] = set()
    pending = [path]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    return f"{entry.path} is a symbolic link (checkpoints hold only regular files)"
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif not entry.is_file(follow_symlinks=False):
                    return f"{entry.path} is not a regular file"
                else:
                    found.add(Path(entry.path).relative_to(path).as_posix())
    found.discard(MANIFEST)
    unlisted, missing = sorted(found - set(files)), sorted(set(files) - found)
    problems = [f"{path / rel} is not listed in its manifest" for rel in unlisted[:3]]
    problems += [f"{path / rel} is listed in its manifest but missing" for rel in missing[:3]]
    if not problems:
        return None
    more = len(unlisted) + len(missing) - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


def file_problem(path: Path, want: Any) -> str | None:
    """What is wrong with ``path`` against its manifest entry ``want``; None when it matches."""
    malformed = not isinstance(want, dict) or not {"bytes", "sha256"} <= want.keys()
    if malformed or path.is_symlink() or not path.is_file():
        return "is missing, not a regular file, or has a malformed manifest entry"
    digest, size = sha256_file(path)
    if size != want["bytes"] or digest != want["sha256"]:
        return (
            f"has {size} bytes sha256 {digest[:16]}…, manifest says "
            f"{want['bytes']} bytes sha256 {want['sha256'][:16]}…"
        )
    return None


def disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also as torch's zip writer reports it (``unexpected pos`` on a short
    write) when the filesystem has no room left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(exc)
    return "No space left" in text or "unexpected pos" in text or "file too large" in text.lower()


def write_error(tmp: Path, step: int, exc: BaseException) -> str:
    """The message for a checkpoint whose files could not be written."""
    where = tmp.parent
    fsize_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    efbig = isinstance(exc, OSError) and exc.errno == errno.EFBIG
    if efbig or (disk_full(exc) and fsize_limit != resource.RLIM_INFINITY):
        return (
            f"checkpoint {step} was not written under {where}: file too large for this "
            f"process's file-size limit (ulimit -f: {fsize_limit} bytes). The previous "
            "checkpoints are untouched; raise the limit, then `regimen resume` the run"
        )
    if disk_full(exc):
        free = shutil.disk_usage(where).free if where.exists() else 0
        return (
            f"checkpoint {step} was not written: disk full under {where} ({free} bytes free). "
            "The previous checkpoints are untouched; free space or lower checkpoint.keep, "
            "then `regimen resume` the run"
        )
    return (
        f"checkpoint {step} was not written to {tmp} ({type(exc).__name__}: {exc}); "
        "the previous checkpoints are untouched"
    )
