"""Checkpoint mirroring to object storage through pyarrow (a file:// URI: same code path as s3://)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from orchestrator.engine.remote import CheckpointMirror, is_remote, run_storage_uri
from orchestrator.errors import CheckpointError


def _committed(root: Path, step: int, payload: bytes) -> tuple[Path, dict]:
    """A committed checkpoint directory as CheckpointStore lays it out."""
    d = root / f"step-{step:08d}"
    (d / "ds").mkdir(parents=True)
    (d / "regimen").mkdir()
    files = {"ds/model.pt": payload, "regimen/rank00000.pt": payload[::-1]}
    for rel, data in files.items():
        (d / rel).write_bytes(data)
    manifest = {
        "format": 1,
        "step": step,
        "files": {
            rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for rel, data in files.items()
        },
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d, manifest


def test_storage_uris_are_told_apart_from_paths():
    assert is_remote("s3://bucket/runs") and is_remote("file:///mnt/x") and is_remote("gs://b")
    assert not is_remote("./runs") and not is_remote("/abs/runs") and not is_remote("http://x")
    assert run_storage_uri("s3://b/p/", "abc") == "s3://b/p/abc/checkpoints"


def test_push_then_pull_on_a_fresh_node_restores_identical_files(tmp_path: Path):
    mirror = CheckpointMirror(f"file://{tmp_path}/bucket/run1/checkpoints")
    for step in (4, 8):
        d, manifest = _committed(tmp_path / "node-a", step, bytes([step]) * 1000)
        mirror.push(step, d, manifest)
    assert mirror.steps() == [4, 8]

    fresh = tmp_path / "node-b" / "checkpoints"
    assert mirror.pull_latest(fresh, newer_than=None) == 8
    pulled = fresh / "step-00000008"
    assert (pulled / "ds" / "model.pt").read_bytes() == bytes([8]) * 1000
    assert json.loads((pulled / "manifest.json").read_text())["step"] == 8
    assert mirror.pull_latest(fresh, newer_than=8) is None  # nothing newer: nothing copied
    assert not [p for p in fresh.iterdir() if p.name.startswith(".tmp")]


def test_an_upload_cut_short_is_never_pulled(tmp_path: Path):
    mirror = CheckpointMirror(f"file://{tmp_path}/bucket/checkpoints")
    d, manifest = _committed(tmp_path / "node-a", 4, b"a" * 100)
    mirror.push(4, d, manifest)
    d, manifest = _committed(tmp_path / "node-a", 8, b"b" * 100)
    mirror.push(8, d, manifest)
    (tmp_path / "bucket" / "checkpoints" / "step-00000008" / "manifest.json").unlink()
    assert mirror.steps() == [4]
    assert mirror.pull_latest(tmp_path / "node-b", newer_than=None) == 4


def test_a_manifest_upload_cut_short_is_never_seen(tmp_path: Path, monkeypatch):
    """The writer dies half-way through the manifest itself: readers never see it."""
    mirror = CheckpointMirror(f"file://{tmp_path}/bucket/checkpoints")
    d, manifest = _committed(tmp_path / "node-a", 4, b"a" * 100)
    mirror.push(4, d, manifest)
    d, manifest = _committed(tmp_path / "node-a", 8, b"b" * 100)
    upload = mirror._upload

    def dies_in_the_manifest(src: Path, dest: str) -> None:
        if "manifest.json" not in dest:
            return upload(src, dest)
        with mirror.fs.open_output_stream(dest) as out:
            out.write(src.read_bytes()[:10])
        raise OSError("connection reset")

    monkeypatch.setattr(mirror, "_upload", dies_in_the_manifest)
    with pytest.raises(OSError):
        mirror.push(8, d, manifest)
    assert mirror.steps() == [4]
    assert mirror.pull_latest(tmp_path / "node-b", newer_than=None) == 4


def test_a_tampered_remote_file_is_refused_and_leaves_nothing(tmp_path: Path):
    mirror = CheckpointMirror(f"file://{tmp_path}/bucket/checkpoints")
    d, manifest = _committed(tmp_path / "node-a", 4, b"a" * 100)
    mirror.push(4, d, manifest)
    (tmp_path / "bucket" / "checkpoints" / "step-00000004" / "ds" / "model.pt").write_bytes(b"x")
    local = tmp_path / "node-b"
    with pytest.raises(CheckpointError, match="sha256"):
        mirror.pull_latest(local, newer_than=None)
    assert list(local.iterdir()) == []


def _remote_with_entry(tmp_path: Path, rel: str, data: bytes) -> CheckpointMirror:
    """A committed remote checkpoint whose manifest also lists ``rel`` (hash of ``data``), with
    ``data`` stored where a reader that joins ``step-dir/rel`` would find it."""
    mirror = CheckpointMirror(f"file://{tmp_path}/bucket/checkpoints")
    d, manifest = _committed(tmp_path / "node-a", 4, b"a" * 100)
    mirror.push(4, d, manifest)
    remote = tmp_path / "bucket" / "checkpoints" / "step-00000004"
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    planted = remote / rel.lstrip("/")  # where ``f"{step_dir}/{rel}"`` reads it from
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(data)
    (remote / "manifest.json").write_text(json.dumps(manifest))
    return mirror


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_a_manifest_path_with_dotdot_never_writes_outside_the_store(tmp_path: Path, depth: int):
    """A manifest entry ``../../x`` must not reach out of the download directory."""
    local = tmp_path / "node-b" / "run" / "checkpoints"
    escaped = (local / ".tmp-pull-step-00000004" / ("../" * depth) / "evil.sh").resolve()
    rel = "ds/" + "../" * (depth + 1) + "evil.sh"
    mirror = _remote_with_entry(tmp_path, rel, b"#!/bin/sh\necho pwned\n")
    before = escaped.exists()
    with pytest.raises(CheckpointError, match=r"'\.\.'.*refusing to pull") as exc:
        mirror.pull_latest(local, newer_than=None)
    assert rel in str(exc.value) and "Delete" in str(exc.value)
    assert escaped.exists() == before, f"pull wrote {escaped}, outside {local}"
    assert list(local.iterdir()) == []


def test_an_absolute_manifest_path_is_refused(tmp_path: Path):
    target = tmp_path / "outside" / "authorized_keys"
    mirror = _remote_with_entry(tmp_path, str(target), b"ssh-ed25519 AAAA attacker")
    local = tmp_path / "node-b"
    with pytest.raises(CheckpointError, match="absolute path.*refusing to pull"):
        mirror.pull_latest(local, newer_than=None)
    assert not target.parent.exists(), "pull wrote to an absolute path from the manifest"
    assert list(local.iterdir()) == []


@pytest.mark.parametrize("where", ["ds/model.pt", "ds"])
def test_a_link_in_the_remote_checkpoint_is_refused(tmp_path: Path, where: str):
    """A link on the storage side (here file://) would make the pull read whatever it points
    to; it is refused, not followed."""
    mirror = CheckpointMirror(f"file://{tmp_path}/bucket/checkpoints")
    d, manifest = _committed(tmp_path / "node-a", 4, b"a" * 100)
    mirror.push(4, d, manifest)
    remote = tmp_path / "bucket" / "checkpoints" / "step-00000004" / where
    real = tmp_path / "elsewhere" / remote.name
    real.parent.mkdir()
    remote.rename(real)
    remote.symlink_to(real, target_is_directory=real.is_dir())
    local = tmp_path / "node-b"
    with pytest.raises(CheckpointError, match="is a link or not a regular file"):
        mirror.pull_latest(local, newer_than=None)
    assert list(local.iterdir()) == []


def test_retention_is_mirrored(tmp_path: Path):
    mirror = CheckpointMirror(f"file://{tmp_path}/bucket/checkpoints")
    for step in (4, 8, 12):
        d, manifest = _committed(tmp_path / "node-a", step, b"z" * 10)
        mirror.push(step, d, manifest)
    assert mirror.remove([4, 99]) == [4]
    assert mirror.steps() == [8, 12]


def test_a_run_resumes_from_object_storage_after_its_node_is_gone(tmp_path: Path, gloo_world):
    """Train with storage on a URI, lose the node-local copy, resume: identical final weights."""
    import shutil

    import torch

    from conftest import tiny_recipe
    from orchestrator.engine.loop import Trainer, WorkerContext

    def recipe(name: str):
        return tiny_recipe(
            tmp_path,
            schedule={"steps": 8},
            checkpoint={
                "every": 4,
                "keep": 1,
                "storage": f"file://{tmp_path}/bucket/{name}",
                "local_dir": str(tmp_path / "node" / name),
            },
        )

    straight = Trainer(recipe("a"), WorkerContext(run_dir=tmp_path / "node" / "a" / "run"))
    straight.run()

    cut = recipe("b")
    local = tmp_path / "node" / "b" / "run"
    Trainer(cut, WorkerContext(run_dir=local, stop_after_steps=4)).run()
    mirror = CheckpointMirror(f"file://{tmp_path}/bucket/b/run/checkpoints")
    assert mirror.steps() == [4]  # committed checkpoints were mirrored
    shutil.rmtree(tmp_path / "node" / "b")  # the cluster and its disks are gone

    resumed = Trainer(cut, WorkerContext(run_dir=local))
    summary = resumed.run()
    assert resumed.events[0] == {**resumed.events[0], "kind": "checkpoint_pulled", "step": 4}
    assert any(e["kind"] == "resume" and e["from_step"] == 4 for e in resumed.events)
    assert summary["steps"] == 8
    a = straight.built.engine.module.state_dict()
    b = resumed.built.engine.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed from storage, weights differ"
    assert mirror.steps() == [8]  # retention (keep: 1) is mirrored
