"""CheckpointStore in processes of its own: two ranks, and a crash in the middle of an async
write (moved from tests/unit/engine/test_checkpoint.py: each starts DeepSpeed processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from two_ranks import run_two_ranks
from unit.engine.test_checkpoint import CRASH_MID_WRITE

from conftest import free_port
from orchestrator.engine.checkpoint import CheckpointStore

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
HERE = REPO / "tests" / "unit" / "engine"  # the helpers in test_checkpoint.py


_TWO_RANKS = """
import torch
from test_checkpoint import make_engine, train_step, snapshot, same
from orchestrator.engine.checkpoint import CheckpointStore
from orchestrator.errors import CheckpointError

def expect_error(fn, r, out):
    try:
        fn()
    except CheckpointError as e:
        out.append(f"rank{r} error ok: {e}")
        return
    raise AssertionError(f"rank {r}: no CheckpointError")

def worker(r, root):
    out = []
    engine = make_engine(stage=2)
    train_step(engine, seed=10 + r)
    store = CheckpointStore(root, keep=2, rank=r, world_size=2)
    info = store.save(engine, 1, {"rank": r, "t": torch.full((2,), float(r))})
    names = sorted(info.manifest["files"])
    assert "regimen/rank00000.pt" in names and "regimen/rank00001.pt" in names, names
    assert sum("optim_states" in n for n in names) == 2, names
    saved = snapshot(engine)
    train_step(engine, seed=20 + r)
    store.load_engine(engine, info)
    assert same(snapshot(engine), saved)
    assert store.load_rank_state(info, r)["rank"] == r
    # one rank's bad rank_state fails the save on every rank, nothing written
    bad = {"x": {1}} if r == 1 else {}
    expect_error(lambda: store.save(engine, 2, bad), r, out)
    assert [i.step for i in store.list()] == [1]
    dist.barrier()
    if r == 0:
        f = info.path / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        f.write_bytes(f.read_bytes()[:-1] + b"x")
    dist.barrier()
    expect_error(lambda: store.load_engine(engine, info), r, out)
    print("\\n".join(out), flush=True)
"""


def test_two_ranks_save_load_and_shared_errors(tmp_path: Path) -> None:
    """Two gloo processes, ZeRO-2: per-rank shards/states, and errors raised on every rank."""
    out = run_two_ranks(tmp_path / "two_ranks.py", _TWO_RANKS, tmp_path / "ckpt", paths=(HERE,))
    for r in (0, 1):
        assert out.count(f"rank{r} error ok") == 2, out[-4000:]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in out


_UNLISTED_SHARD = """
import json
from pathlib import Path
import torch
from test_checkpoint import make_engine, train_step
from orchestrator.engine.checkpoint import CheckpointStore
from orchestrator.errors import CheckpointError

class Payload:
    def __init__(self, marker):
        self.marker = marker
    def __reduce__(self):
        return (Path.touch, (self.marker,))

def refused(fn, r):
    try:
        fn()
    except CheckpointError as e:
        assert "not listed in its manifest" in str(e), e
        print(f"rank{r} refused: {e}", flush=True)
        return
    raise AssertionError(f"rank {r}: no CheckpointError")

def worker(r, root, marker):
    engine = make_engine(stage=2)
    train_step(engine, seed=10 + r)
    store = CheckpointStore(root, keep=2, rank=r, world_size=2)
    info = store.save(engine, 1, {"rank": r})
    dist.barrier()
    if r == 0:  # rank 1's shard, which only rank 1 unpickles, swapped and dropped from the list
        rel = "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"
        torch.save({"optimizer_state_dict": Payload(marker)}, info.path / rel)
        manifest = json.loads((info.path / "manifest.json").read_text())
        del manifest["files"][rel]
        (info.path / "manifest.json").write_text(json.dumps(manifest))
    dist.barrier()
    info = store.latest()
    refused(lambda: store.load_engine(engine, info), r)
    refused(lambda: store.load_rank_state(info, r), r)
    assert not Path(marker).exists(), "the unlisted shard ran code"
"""


def test_two_ranks_refuse_a_shard_outside_the_manifest(tmp_path: Path) -> None:
    """Rank 0 verifies, rank 1 unpickles its own ZeRO-2 shard: a shard swapped for a malicious
    pickle and dropped from the manifest is refused on both ranks and never runs."""
    marker = tmp_path / "pwned"
    out = run_two_ranks(
        tmp_path / "unlisted.py", _UNLISTED_SHARD, tmp_path / "ckpt", marker, paths=(HERE,)
    )
    for r in (0, 1):
        assert out.count(f"rank{r} refused") == 2, out[-4000:]
    assert not marker.exists(), "an unlisted ZeRO shard ran code on load"


def test_crash_mid_async_write_leaves_no_loadable_partial(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    script = CRASH_MID_WRITE.format(
        tests=str(REPO / "tests"), port=str(free_port()), root=str(root)
    )
    # LOCAL_RANK came from the unit module's gloo fixture when this test lived there
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 9, proc.stderr[-2000:]
    partial = root / ".tmp-step-00000002"
    assert partial.is_dir() and any(partial.rglob("*.pt"))  # something was written ...
    store = CheckpointStore(root, keep=0)
    assert [i.step for i in store.list()] == [1]  # ... but only step 1 is loadable
    latest = store.latest()
    assert latest is not None and store.load_rank_state(latest, 0) == {"v": 1}
