"""Loading never runs code: tampered checkpoints are refused before anything is unpickled,
and a malicious pickle in a rank-state file is never executed, even with a forged manifest.

The payloads are real: unpickling them would create a marker file (``os.system``-style
``__reduce__``); each test asserts the marker never appears.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from chaos.ckpt_helpers import make_engine, train_step

from orchestrator.engine.checkpoint import CheckpointStore
from orchestrator.errors import CheckpointError


class _Payload:
    """Unpickling this touches ``marker``: the stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _saved(tmp_path: Path) -> tuple[CheckpointStore, Any]:
    engine = make_engine()
    train_step(engine, 1)
    store = CheckpointStore(tmp_path / "ckpts", keep=0)
    info = store.save(engine, 1, {"step": 1}, meta={"step": 1})
    return store, info


def _forge_manifest(info: Any, rel: str) -> None:
    """Rewrite the manifest entry of ``rel`` to match its current bytes (a thorough attacker)."""
    data = (info.path / rel).read_bytes()
    manifest = json.loads((info.path / "manifest.json").read_text())
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (info.path / "manifest.json").write_text(json.dumps(manifest))


def test_malicious_rank_state_without_forged_manifest_is_refused(
    tmp_path: Path, gloo_world: None
) -> None:
    store, info = _saved(tmp_path)
    marker = tmp_path / "pwned"
    (info.path / "regimen" / "rank00000.pt").write_bytes(pickle.dumps({"x": _Payload(marker)}))
    with pytest.raises(CheckpointError, match="corrupt or was tampered with") as exc:
        store.load_rank_state(store.latest(), 0)  # type: ignore[arg-type]
    assert "rank00000.pt" in str(exc.value) and "delete" in str(exc.value)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["pickle", "torch"])
def test_malicious_rank_state_with_forged_manifest_is_never_executed(
    tmp_path: Path, gloo_world: None, fmt: str
) -> None:
    store, info = _saved(tmp_path)
    marker = tmp_path / "pwned"
    path = info.path / "regimen" / "rank00000.pt"
    if fmt == "pickle":
        path.write_bytes(pickle.dumps({"x": _Payload(marker)}))
    else:
        torch.save({"x": _Payload(marker)}, path)
    _forge_manifest(info, "regimen/rank00000.pt")
    with pytest.raises(Exception) as exc:
        store.load_rank_state(store.latest(), 0)  # type: ignore[arg-type]
    assert "weights_only" in str(exc.value) or "Unsupported" in str(exc.value), exc.value
    assert not marker.exists()


def test_tampered_deepspeed_file_is_refused_before_deepspeed_reads_it(
    tmp_path: Path, gloo_world: None
) -> None:
    """DeepSpeed unpickles its own files with full pickle; the manifest check must come first."""
    store, info = _saved(tmp_path)
    marker = tmp_path / "pwned"
    (info.path / "ds" / "mp_rank_00_model_states.pt").write_bytes(
        pickle.dumps({"module": _Payload(marker)})
    )
    fresh = make_engine(seed=1)
    with pytest.raises(CheckpointError, match="corrupt or was tampered with") as exc:
        store.load_engine(fresh, store.latest())  # type: ignore[arg-type]
    assert "mp_rank_00_model_states.pt" in str(exc.value)
    assert not marker.exists()


def test_truncated_checkpoint_is_refused(tmp_path: Path, gloo_world: None) -> None:
    store, info = _saved(tmp_path)
    optim = next((info.path / "ds").glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="resume from|restart the run"):
        store.load_engine(make_engine(seed=1), store.latest())  # type: ignore[arg-type]


def test_forged_deepspeed_file_is_never_executed(tmp_path: Path, gloo_world: None) -> None:
    store, info = _saved(tmp_path)
    marker = tmp_path / "pwned"
    rel = "ds/mp_rank_00_model_states.pt"
    torch.save({"module": _Payload(marker)}, info.path / rel)
    _forge_manifest(info, rel)
    with pytest.raises(CheckpointError, match="would import .*refusing to unpickle"):
        store.load_engine(make_engine(seed=1), store.latest())  # type: ignore[arg-type]
    assert not marker.exists(), "a forged DeepSpeed checkpoint file ran code on load"
