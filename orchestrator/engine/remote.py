"""Checkpoints on object storage: committed checkpoints mirrored to any pyarrow filesystem.

When ``checkpoint.storage`` is a URI (``s3://bucket/prefix``, ``gs://…``, ``hdfs://…``,
``abfs://…``, ``file:///…``), each run trains against a node-local working copy under
``checkpoint.local_dir`` (DeepSpeed writes to local files) and every *committed*
checkpoint is copied to ``<storage>/<run_id>/checkpoints/step-N/``, its files first
and ``manifest.json`` last. The manifest is the commit marker on the remote side too:
a step directory without one (an upload cut short) is never pulled. Retention is
mirrored: steps the local store's retention drops are deleted remotely. A run's exported
model (``export/``, :func:`push_export`) is mirrored the same way, its record last.

On start (resume, or a restart on a fresh node after the cluster is gone) the newest
remote checkpoint that is newer than anything local is downloaded into a temporary
directory, every file is checked against the manifest's SHA-256, and only then is the
directory renamed into the local store, where :class:`CheckpointStore` sees it as an
ordinary committed checkpoint. Nothing a remote manifest or listing says reaches outside
that directory: a manifest name that is absolute or holds ``..``
(:func:`~orchestrator.engine.checkpoint.io.name_problem`), a remote entry that is a link or
neither a file nor a directory, or a target that would resolve outside the download
directory makes the pull fail with CheckpointError before that file is written.

Credentials come from the environment as pyarrow reads them (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL`` for S3-compatible stores such as MinIO, …); they never appear in a
recipe or in MLflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from orchestrator.engine.checkpoint.io import name_problem
from orchestrator.errors import CheckpointError
from orchestrator.recipe.storage import is_remote as is_remote
from orchestrator.rundir import ABANDONED, CHECKPOINTS, EXPORT

MANIFEST = "manifest.json"
_CHUNK = 8 << 20


def run_storage_uri(storage: str, run_id: str) -> str:
    """Where one run's checkpoints live under a storage URI."""
    return f"{storage.rstrip('/')}/{run_id}/{CHECKPOINTS}"


def push_export(
    storage: str, run_id: str, local_dir: Path, files: Iterable[str], marker: str
) -> str:
    """Mirror a run's exported model to ``<storage>/<run_id>/export/``; the URI written.

    An earlier remote export is deleted first, so its marker never vouches for new files;
    ``marker`` (the export record, listing every file's SHA-256) is uploaded last."""
    mirror = CheckpointMirror(f"{storage.rstrip('/')}/{run_id}/{EXPORT}")
    mirror.fs.delete_dir_contents(mirror.root, missing_dir_ok=True)
    mirror.push_files(mirror.root, local_dir, files, marker)
    return mirror.uri


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointMirror:
    """The remote copy of one run's committed checkpoints (push after commit, pull on start)."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs

        try:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with its reason
            raise CheckpointError(
                f"checkpoint.storage {uri!r} is not reachable: {exc}. Check the URI and the "
                "credentials in the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)"
            ) from None
        self.uri = uri
        self.root = self.root.rstrip("/")

    # -- push ---------------------------------------------------------------------------------
    def push(self, step: int, local_dir: Path, manifest: dict[str, Any]) -> None:
        """Upload one committed checkpoint: every file of the manifest, then the manifest."""
        self.push_files(f"{self.root}/{_step_name(step)}", local_dir, manifest["files"], MANIFEST)

    def push_files(self, dest: str, local_dir: Path, files: Iterable[str], marker: str) -> None:
        """Upload ``files`` (names relative to ``local_dir``) to ``dest``, then ``marker``,
        the commit marker: written under another name and moved into place, so a reader never
        sees a half-written one (a rename on file://; object stores only show an object once
        its upload is complete anyway)."""
        self.fs.create_dir(dest, recursive=True)
        for rel in sorted(files):
            parent = f"{dest}/{rel}".rsplit("/", 1)[0]
            self.fs.create_dir(parent, recursive=True)
            self._upload(local_dir / rel, f"{dest}/{rel}")
        self._upload(local_dir / marker, f"{dest}/{marker}.partial")
        self.fs.move(f"{dest}/{marker}.partial", f"{dest}/{marker}")

    def _upload(self, src: Path, dest: str) -> None:
        with open(src, "rb") as f, self.fs.open_output_stream(dest) as out:
            while chunk := f.read(_CHUNK):
                out.write(chunk)

    def remove(self, steps: list[int]) -> list[int]:
        """Delete these remote checkpoints (the ones local retention just dropped); the
        steps that were there. Older remote steps that were never local (a resumed run
        pulls only the newest) are left alone."""
        present = set(self.steps(committed_only=False))
        for step in steps:
            if step in present:
                self.fs.delete_dir(f"{self.root}/{_step_name(step)}")
        return [s for s in steps if s in present]

    def abandon_after(self, step: int, label: str) -> list[int]:
        """Move remote checkpoints after ``step`` to ``../abandoned/<label>/`` (a manual
        rollback's discarded timeline: kept, never pulled again); the steps moved."""
        moved = []
        target = f"{self.root.rsplit('/', 1)[0]}/{ABANDONED}/{label}"
        for s in self.steps(committed_only=False):
            if s > step:
                self.fs.create_dir(target, recursive=True)
                self.fs.move(f"{self.root}/{_step_name(s)}", f"{target}/{_step_name(s)}")
                moved.append(s)
        return moved

    # -- pull ---------------------------------------------------------------------------------
    def steps(self, committed_only: bool = True) -> list[int]:
        """Remote step directories (only those holding a manifest, unless told otherwise)."""
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except OSError:
            return []
        out = []
        for info in infos:
            name = info.base_name
            if info.type != pafs.FileType.Directory or not name.startswith("step-"):
                continue
            if not name[5:].isdigit():
                continue
            if committed_only:
                manifest = self.fs.get_file_info(f"{info.path}/{MANIFEST}")
                if manifest.type != pafs.FileType.File:
                    continue
            out.append(int(name[5:]))
        return sorted(out)

    def pull_latest(
        self, local_root: Path, newer_than: int | None, at_or_before: int | None = None
    ) -> int | None:
        """Download the newest committed remote checkpoint (with ``step <= at_or_before`` when
        given) if it is newer than ``newer_than``.

        Returns the step pulled, or None. Every file is verified against the manifest's
        SHA-256 before the directory is renamed into ``local_root``; a mismatch raises
        CheckpointError and leaves nothing behind. So does a manifest name that is absolute,
        holds ``..`` or resolves outside the download directory, and a link in the remote
        step directory: nothing is ever written outside ``local_root``."""
        steps = [
            s
            for s in self.steps()
            if (newer_than is None or s > newer_than)
            and (at_or_before is None or s <= at_or_before)
        ]
        if not steps:
            return None
        step = steps[-1]
        src = f"{self.root}/{_step_name(step)}"
        local_root.mkdir(parents=True, exist_ok=True)
        tmp = local_root / f".tmp-pull-{_step_name(step)}"
        if tmp.is_symlink():
            tmp.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            manifest = json.loads(self._read(f"{src}/{MANIFEST}"))
            files = manifest.get("files") if isinstance(manifest, dict) else None
            if not isinstance(files, dict):
                raise self._refusal(step, "its manifest has no file list")
            self._refuse_links(step)
            tmp.mkdir()
            for rel, want in sorted(files.items()):
                target = self._target(step, tmp, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = self._download(f"{src}/{rel}", target)
                if not isinstance(want, dict) or digest != want.get("sha256"):
                    raise CheckpointError(
                        f"remote checkpoint {self.uri}/{_step_name(step)}: {rel} fails its "
                        "sha256 check against the manifest; it was modified after upload. "
                        f"Delete {self.uri}/{_step_name(step)} to fall back to an older one"
                    )
            (tmp / MANIFEST).write_text(json.dumps(manifest))
            os.replace(tmp, local_root / _step_name(step))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return step

    def _where(self, step: int) -> str:
        return f"remote checkpoint {self.uri}/{_step_name(step)}"

    def _refusal(self, step: int, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self._where(step)}: {what}; refusing to pull it (nothing was written outside "
            f"the download directory). Delete {self.uri}/{_step_name(step)} to fall back to "
            "an older one"
        )

    def _target(self, step: int, tmp: Path, rel: Any) -> Path:
        """Where manifest name ``rel`` is downloaded to: inside ``tmp`` or CheckpointError."""
        problem = name_problem(rel)
        if problem is not None:
            raise self._refusal(step, f"its manifest entry {rel!r} {problem}")
        target = tmp / rel
        base = tmp.resolve()
        if not target.resolve().is_relative_to(base) or target.resolve() == base:
            raise self._refusal(step, f"its manifest entry {rel!r} resolves outside {tmp}")
        return target

    def _refuse_links(self, step: int) -> None:
        """CheckpointError if anything under the remote step directory is a link or neither a
        file nor a directory. Object stores have no links; pyarrow's local filesystem
        (``file://``) follows them silently, so there each entry is also checked with
        ``os.path.islink``."""
        import pyarrow.fs as pafs

        src = f"{self.root}/{_step_name(step)}"
        local = isinstance(self.fs, pafs.LocalFileSystem)
        if local and os.path.islink(src):
            raise self._refusal(step, "its directory is a link")
        selector = pafs.FileSelector(src, recursive=True)
        for info in self.fs.get_file_info(selector):
            kinds = (pafs.FileType.File, pafs.FileType.Directory)
            if info.type not in kinds or (local and os.path.islink(info.path)):
                rel = info.path[len(src) :].lstrip("/")
                raise self._refusal(step, f"{rel} is a link or not a regular file")

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return bytes(f.read())

    def _download(self, src: str, target: Path) -> str:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(src) as f, open(target, "wb") as out:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        return digest.hexdigest()
