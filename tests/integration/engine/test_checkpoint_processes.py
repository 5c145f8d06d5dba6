"""CheckpointStore in processes of its own: two ranks, and a crash in the middle of an async
write (moved from tests/unit/engine/test_checkpoint.py: each starts DeepSpeed processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from unit.engine.test_checkpoint import CRASH_MID_WRITE

from orchestrator.engine.checkpoint import CheckpointStore

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]


_TWO_RANKS = """
import os, sys, socket
import torch, torch.distributed as dist, torch.multiprocessing as mp
sys.path[:0] = [{repo!r}, {here!r}]
from test_checkpoint import make_engine, train_step, snapshot, same
from orchestrator.engine.checkpoint import CheckpointStore
from orchestrator.errors import CheckpointError

def expect_error(fn, r, out):
    try:
        fn()
    except CheckpointError as e:
        out.append(f"rank{{r}} error ok: {{e}}")
        return
    raise AssertionError(f"rank {{r}}: no CheckpointError")

def worker(r, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                      WORLD_SIZE="2", LOCAL_RANK=str(r), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=r, world_size=2)
    out = []
    engine = make_engine(stage=2)
    train_step(engine, seed=10 + r)
    store = CheckpointStore(root, keep=2, rank=r, world_size=2)
    info = store.save(engine, 1, {{"rank": r, "t": torch.full((2,), float(r))}})
    names = sorted(info.manifest["files"])
    assert "regimen/rank00000.pt" in names and "regimen/rank00001.pt" in names, names
    assert sum("optim_states" in n for n in names) == 2, names
    saved = snapshot(engine)
    train_step(engine, seed=20 + r)
    store.load_engine(engine, info)
    assert same(snapshot(engine), saved)
    assert store.load_rank_state(info, r)["rank"] == r
    # one rank's bad rank_state fails the save on every rank, nothing written
    bad = {{"x": {{1}}}} if r == 1 else {{}}
    expect_error(lambda: store.save(engine, 2, bad), r, out)
    assert [i.step for i in store.list()] == [1]
    dist.barrier()
    if r == 0:
        f = info.path / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        f.write_bytes(f.read_bytes()[:-1] + b"x")
    dist.barrier()
    expect_error(lambda: store.load_engine(engine, info), r, out)
    print("\\n".join(out), flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.spawn(worker, args=(port, sys.argv[1]), nprocs=2)
    print("ALL OK")
"""


def test_two_ranks_save_load_and_shared_errors(tmp_path: Path) -> None:
    """Two gloo processes, ZeRO-2: per-rank shards/states, and errors raised on every rank."""
    script = tmp_path / "two_ranks.py"
    here = str(REPO / "tests" / "unit" / "engine")  # the helpers in test_checkpoint.py
    script.write_text(textwrap.dedent(_TWO_RANKS.format(repo=str(REPO), here=here)))
    out = _run_two_ranks(script, tmp_path / "ckpt")
    for r in (0, 1):
        assert out.count(f"rank{r} error ok") == 2, out[-4000:]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in out


_UNLISTED_SHARD = """
import json, os, sys, socket
from pathlib import Path
import torch, torch.distributed as dist, torch.multiprocessing as mp
sys.path[:0] = [{repo!r}, {here!r}]
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
        print(f"rank{{r}} refused: {{e}}", flush=True)
        return
    raise AssertionError(f"rank {{r}}: no CheckpointError")

def worker(r, port, root, marker):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                      WORLD_SIZE="2", LOCAL_RANK=str(r), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=r, world_size=2)
    engine = make_engine(stage=2)
    train_step(engine, seed=10 + r)
    store = CheckpointStore(root, keep=2, rank=r, world_size=2)
    info = store.save(engine, 1, {{"rank": r}})
    dist.barrier()
    if r == 0:  # rank 1's shard, which only rank 1 unpickles, swapped and dropped from the list
        rel = "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"
        torch.save({{"optimizer_state_dict": Payload(marker)}}, info.path / rel)
        manifest = json.loads((info.path / "manifest.json").read_text())
        del manifest["files"][rel]
        (info.path / "manifest.json").write_text(json.dumps(manifest))
    dist.barrier()
    info = store.latest()
    refused(lambda: store.load_engine(engine, info), r)
    refused(lambda: store.load_rank_state(info, r), r)
    assert not os.path.exists(marker), "the unlisted shard ran code"
    dist.destroy_process_group()

if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.spawn(worker, args=(port, sys.argv[1], sys.argv[2]), nprocs=2)
    print("ALL OK")
"""


def test_two_ranks_refuse_a_shard_outside_the_manifest(tmp_path: Path) -> None:
    """Rank 0 verifies, rank 1 unpickles its own ZeRO-2 shard: a shard swapped for a malicious
    pickle and dropped from the manifest is refused on both ranks and never runs."""
    script = tmp_path / "unlisted.py"
    here = str(REPO / "tests" / "unit" / "engine")
    script.write_text(textwrap.dedent(_UNLISTED_SHARD.format(repo=str(REPO), here=here)))
    marker = tmp_path / "pwned"
    out = _run_two_ranks(script, tmp_path / "ckpt", marker)
    for r in (0, 1):
        assert out.count(f"rank{r} refused") == 2, out[-4000:]
    assert not marker.exists(), "an unlisted ZeRO shard ran code on load"


def test_crash_mid_async_write_leaves_no_loadable_partial(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    script = CRASH_MID_WRITE.format(tests=str(REPO / "tests"), port=str(_port()), root=str(root))
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


def _run_two_ranks(script: Path, *args: Path) -> str:
    """Run a two-rank script (it spawns both ranks); its output, once it printed ALL OK."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=REPO,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "ALL OK" in proc.stdout
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
