"""CheckpointStore against real DeepSpeed engines (CPU, gloo, world size 1)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from orchestrator.engine.checkpoint import CheckpointStore, atomic_write_bytes, atomic_write_json
from orchestrator.errors import CheckpointError

REPO = Path(__file__).resolve().parents[3]


def make_engine(stage: int = 1, seed: int = 0) -> Any:
    """A real DeepSpeed engine over a tiny 2-layer MLP."""
    import deepspeed

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        config={
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
        },
    )
    return engine


def train_step(engine: Any, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)
    loss = nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()


def snapshot(engine: Any) -> list[torch.Tensor]:
    """Module weights + the base optimizer's params (ZeRO fp32 partitions) and state, in order."""
    out = [p.detach().clone() for p in engine.module.parameters()]
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in base.param_groups:
        for p in group["params"]:
            out.append(p.detach().clone())
            for v in base.state[p].values():
                out.append(torch.as_tensor(v).detach().clone())
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture
def engine(gloo_world: None) -> Any:
    e = make_engine(stage=1)
    train_step(e, seed=1)
    return e


def test_retention_keeps_newest(engine: Any, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for step in (10, 20, 30, 40):
        info = store.save(engine, step, {"step": step})
        assert info.path == tmp_path / f"step-{step:08d}"
        assert info.manifest["step"] == step
    assert [i.step for i in store.list()] == [30, 40]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000030", "step-00000040"]
    assert store.latest().step == 40
    assert store.latest(at_or_before=35).step == 30
    assert store.latest(at_or_before=5) is None


def test_protected_step_survives_retention(engine: Any, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=1, protect=lambda s: s == 10)
    for step in (10, 20, 30):
        store.save(engine, step, {})
    assert [i.step for i in store.list()] == [10, 30]
    store.verify(store.list()[0])


def test_keep_zero_keeps_all(engine: Any, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=0)
    for step in (1, 2, 3, 4):
        store.save(engine, step, {})
    assert [i.step for i in store.list()] == [1, 2, 3, 4]


def test_manifest_covers_every_file(engine: Any, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=0)
    info = store.save(engine, 7, {"x": 1}, meta={"loss": 1.5})
    on_disk = json.loads((info.path / "manifest.json").read_text())
    assert on_disk == info.manifest
    assert on_disk["format"] == 1 and on_disk["world_size"] == 1 and on_disk["meta"]["loss"] == 1.5
    files = {p.relative_to(info.path).as_posix() for p in info.path.rglob("*") if p.is_file()}
    assert set(on_disk["files"]) == files - {"manifest.json"}
    assert "regimen/rank00000.pt" in files
    assert any(f.startswith("ds/") and "optim_states" in f for f in files)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_round_trip_restores_weights_and_optimizer(
    gloo_world: None, tmp_path: Path, stage: int
) -> None:
    engine = make_engine(stage=stage)
    train_step(engine, seed=1)
    store = CheckpointStore(tmp_path, keep=0)
    rng = torch.get_rng_state()
    rank_state = {"cursor": 17, "lr": 0.5, "rng": rng, "hist": [1.0, None, "a"], "t": (1, 2)}
    info = store.save(engine, 1, rank_state)
    saved = snapshot(engine)
    train_step(engine, seed=2)
    expected_after = snapshot(engine)  # the uninterrupted timeline after one more step
    train_step(engine, seed=3)
    train_step(engine, seed=4)
    assert not same(snapshot(engine), saved)

    store.load_engine(engine, info)
    assert same(snapshot(engine), saved)
    train_step(engine, seed=2)
    assert same(snapshot(engine), expected_after)

    got = store.load_rank_state(info, 0)
    assert got["cursor"] == 17 and got["hist"] == [1.0, None, "a"] and got["t"] == (1, 2)
    assert torch.equal(got["rng"], rng)


def test_dirs_without_manifest_and_tmp_dirs_are_ignored(engine: Any, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=0)
    store.save(engine, 5, {})
    (tmp_path / "step-00000009" / "ds").mkdir(parents=True)  # no manifest
    (tmp_path / ".tmp-step-00000010" / "ds").mkdir(parents=True)
    bad = tmp_path / "step-00000011"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    assert [i.step for i in store.list()] == [5]
    assert store.latest().step == 5
    removed = store.cleanup_partial()
    assert removed == [tmp_path / ".tmp-step-00000010"]
    assert not removed[0].exists()


def test_next_save_removes_stale_tmp(engine: Any, tmp_path: Path) -> None:
    stale = tmp_path / ".tmp-step-00000003"
    (stale / "junk").mkdir(parents=True)
    store = CheckpointStore(tmp_path, keep=0)
    store.save(engine, 3, {})
    assert not stale.exists()
    assert "junk" not in store.latest().manifest["files"]


def test_flipped_byte_is_detected(engine: Any, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=0)
    store.save(engine, 1, {})
    info = store.save(engine, 2, {})
    target = next(p for p in sorted(info.path.rglob("*optim_states.pt")))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    for call in (lambda: store.verify(info), lambda: store.load_engine(engine, info)):
        with pytest.raises(CheckpointError) as exc:
            call()
        msg = str(exc.value)
        assert target.name in msg and "corrupt" in msg and "step 1" in msg
    store.verify(store.latest(at_or_before=1))


def test_tampered_rank_state_is_rejected(engine: Any, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=0)
    info = store.save(engine, 1, {"a": torch.zeros(3)})
    torch.save({"a": torch.ones(3)}, info.path / "regimen" / "rank00000.pt")
    with pytest.raises(CheckpointError, match=r"rank00000\.pt"):
        store.load_rank_state(info, 0)
    with pytest.raises(CheckpointError, match="no state for rank 3"):
        store.load_rank_state(info, 3)


def test_world_size_mismatch_on_load(engine: Any, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=0)
    info = store.save(engine, 1, {})
    forged = {**info.manifest, "world_size": 4}
    with pytest.raises(CheckpointError, match="world size 4"):
        store.load_engine(engine, type(info)(info.step, info.path, forged))


class _Custom:
    pass


@pytest.mark.parametrize(
    "bad", [{"s": {1, 2}}, {"o": _Custom()}, {"n": [torch.zeros(1).numpy()]}, {1.5j: 1}]
)
def test_non_weights_only_rank_state_rejected(engine: Any, tmp_path: Path, bad: dict) -> None:
    store = CheckpointStore(tmp_path, keep=0)
    with pytest.raises(CheckpointError, match="rank_state"):
        store.save(engine, 1, bad)
    assert store.list() == []
    assert not any(tmp_path.iterdir())


def test_crash_before_rename_keeps_previous(
    engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path, keep=1)
    store.save(engine, 10, {"v": 10})

    def boom(*a: Any, **k: Any) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(CheckpointError, match="not committed"):
        store.save(engine, 20, {"v": 20})
    monkeypatch.undo()
    latest = store.latest()
    assert latest is not None and latest.step == 10
    store.verify(latest)
    assert store.load_rank_state(latest, 0) == {"v": 10}
    assert (tmp_path / ".tmp-step-00000020").exists()
    store.load_engine(engine, latest)


def test_crash_writing_manifest_keeps_previous(
    engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path, keep=1)
    store.save(engine, 10, {})
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(CheckpointError):
        store.save(engine, 20, {})
    monkeypatch.undo()
    assert [i.step for i in store.list()] == [10]
    store.save(engine, 30, {})
    assert [i.step for i in store.list()] == [30]
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000030"]


def test_resave_same_step_replaces(engine: Any, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=0)
    store.save(engine, 5, {"v": 1})
    info = store.save(engine, 5, {"v": 2})
    store.verify(info)
    assert store.load_rank_state(info, 0) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000005"]


def test_atomic_write_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "a.json"
    atomic_write_json(p, {"b": 1, "a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"new")
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["a.json"]


# -- asynchronous saves ------------------------------------------------------------------------
def _records(info: Any) -> dict[str, dict[str, bytes]]:
    """Every file's zip records, less the random id torch.save writes into each file (two
    synchronous saves of the same state differ there too)."""
    import zipfile

    out = {}
    for rel in info.manifest["files"]:
        path = info.path / rel
        if not zipfile.is_zipfile(path):  # legacy (non-zip) torch.save format: all bytes
            out[rel] = {"": path.read_bytes()}
            continue
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if not n.endswith(".data/serialization_id")]
            out[rel] = {n: z.read(n) for n in names}
    return out


@pytest.mark.parametrize("stage", [0, 2])
def test_async_save_is_byte_identical_to_sync_and_loads(
    gloo_world: None, tmp_path: Path, stage: int
) -> None:
    engine = make_engine(stage=stage)
    train_step(engine, seed=1)
    state = {"step": 3, "rng": torch.get_rng_state(), "w": engine.module[0].weight.detach()}
    sync = CheckpointStore(tmp_path / "sync", keep=0).save(engine, 3, state, meta={"c": 1})
    store = CheckpointStore(tmp_path / "async", keep=0)
    pending = store.save_async(engine, 3, state, meta={"c": 1})
    info = store.wait()
    assert info is not None and info.step == 3 and pending.error is None
    assert len(info.manifest["files"]) == len(sync.manifest["files"]) >= 2 + (stage > 0)
    assert _records(info) == _records(sync)  # same files, same bytes
    assert info.manifest["meta"] == {"c": 1} and not (info.path / ".done").exists()
    want = snapshot(engine)
    fresh = make_engine(stage=stage, seed=7)
    store.load_engine(fresh, store.latest())  # type: ignore[arg-type]
    assert same(snapshot(fresh), want)


def test_async_training_continues_during_write_and_snapshot_is_isolated(
    engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import orchestrator.engine.checkpoint.async_save as ckpt_async

    slow = ckpt_async.write_file

    def slow_write(real: Any, state: Any, path: str) -> None:
        time.sleep(0.4)  # slow storage
        slow(real, state, path)

    monkeypatch.setattr(ckpt_async, "write_file", slow_write)
    store = CheckpointStore(tmp_path, keep=0)
    saved = snapshot(engine)
    pending = store.save_async(engine, 5, {"step": 5})
    assert store.latest() is None  # not visible before the commit
    for seed in range(3):  # training goes on while the files are written
        train_step(engine, seed=10 + seed)
    assert pending.thread.is_alive() and store.latest() is None
    assert pending.blocked_s < 0.4  # blocked for the host copy only, not the (slow) write
    info = store.wait()
    assert info is not None and store.latest() == info and not pending.thread.is_alive()
    assert not same(snapshot(engine), saved)  # the engine moved on ...
    fresh = make_engine(stage=1, seed=7)
    store.load_engine(fresh, info)
    assert same(snapshot(fresh), saved)  # ... the checkpoint holds the state at save time


def test_async_write_error_is_raised_at_wait_and_nothing_is_committed(
    engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import orchestrator.engine.checkpoint.async_save as ckpt_async

    store = CheckpointStore(tmp_path, keep=0)
    store.save_async(engine, 1, {})
    store.wait()

    def full_disk(real: Any, state: Any, path: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_async, "write_file", full_disk)
    store.save_async(engine, 2, {})
    with pytest.raises(CheckpointError, match="disk full"):
        store.wait()
    assert [i.step for i in store.list()] == [1]
    monkeypatch.undo()
    store.save_async(engine, 3, {})  # the next save cleans the partial one up
    store.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000003"]


# Run in a process of its own by tests/integration/engine/test_checkpoint_processes.py.
CRASH_MID_WRITE = """
import os, sys, time
sys.path.insert(0, {tests!r})
from unit.engine.test_checkpoint import make_engine, train_step
import torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT={port!r}, RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", rank=0, world_size=1)
import orchestrator.engine.checkpoint as ckpt
import orchestrator.engine.checkpoint.async_save as ckpt_async
engine = make_engine(stage=1)
train_step(engine, seed=1)
store = ckpt.CheckpointStore({root!r}, keep=0)
store.save(engine, 1, {{"v": 1}})
real_write = ckpt_async.write_file
def write_then_die(real, state, path):
    real_write(real, state, path)
    os._exit(9)  # killed after the first file of the async write, before the commit
ckpt_async.write_file = write_then_die
store.save_async(engine, 2, {{"v": 2}})
for seed in range(100):
    train_step(engine, seed=seed)
time.sleep(30)
"""
