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


# -- the manifest is the whole checkpoint: nothing outside it is loaded ------------------------
MODEL_STATES = "ds/mp_rank_00_model_states.pt"


def _drop_entry(info: Any, rel: str) -> None:
    manifest = json.loads((info.path / "manifest.json").read_text())
    del manifest["files"][rel]
    (info.path / "manifest.json").write_text(json.dumps(manifest))


def test_deepspeed_file_removed_from_manifest_is_refused_and_never_executed(
    tmp_path: Path, gloo_world: None
) -> None:
    """The attacker swaps in a malicious DeepSpeed file and deletes its manifest entry rather
    than forging it: verification and the scan must still see the file."""
    store, info = _saved(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"module": _Payload(marker)}, info.path / MODEL_STATES)
    _drop_entry(info, MODEL_STATES)
    with pytest.raises(CheckpointError, match="not listed in its manifest") as exc:
        store.load_engine(make_engine(seed=1), store.latest())  # type: ignore[arg-type]
    assert MODEL_STATES in str(exc.value) and "Do not load it" in str(exc.value)
    with pytest.raises(CheckpointError, match="not listed in its manifest"):
        store.load_rank_state(store.latest(), 0)  # type: ignore[arg-type]
    assert not marker.exists(), "a DeepSpeed file outside the manifest ran code on load"


def test_extra_deepspeed_file_is_refused_and_never_executed(
    tmp_path: Path, gloo_world: None
) -> None:
    """DeepSpeed globs ``mp_rank_*_model_states.pt`` and unpickles the first match: an extra
    file sorting before the real one would run its code."""
    store, info = _saved(tmp_path)
    marker = tmp_path / "pwned"
    extra = "ds/mp_rank_-1_model_states.pt"
    torch.save({"module": _Payload(marker)}, info.path / extra)
    with pytest.raises(CheckpointError, match="not listed in its manifest") as exc:
        store.load_engine(make_engine(seed=1), store.latest())  # type: ignore[arg-type]
    assert extra in str(exc.value)
    assert not marker.exists(), "an extra file in a checkpoint ran code on load"


def test_renamed_file_is_refused_naming_both_names(tmp_path: Path, gloo_world: None) -> None:
    store, info = _saved(tmp_path)
    optim = next((info.path / "ds").glob("*optim_states.pt"))
    optim.rename(optim.with_name("renamed.pt"))
    with pytest.raises(CheckpointError) as exc:
        store.load_engine(make_engine(seed=1), store.latest())  # type: ignore[arg-type]
    text = str(exc.value)
    assert "ds/renamed.pt is not listed in its manifest" in text
    assert f"{optim} is listed in its manifest but missing" in text


def test_directory_where_a_file_should_be_is_refused(tmp_path: Path, gloo_world: None) -> None:
    store, info = _saved(tmp_path)
    (info.path / MODEL_STATES).unlink()
    (info.path / MODEL_STATES).mkdir()
    with pytest.raises(CheckpointError, match="listed in its manifest but missing"):
        store.load_engine(make_engine(seed=1), store.latest())  # type: ignore[arg-type]


@pytest.mark.parametrize("what", [MODEL_STATES, "regimen", "."])
def test_symlink_anywhere_in_a_checkpoint_is_refused(
    tmp_path: Path, gloo_world: None, what: str
) -> None:
    """A link to an intact copy outside the directory passes every hash today, yet what it
    points to can change after verification; checkpoints hold only regular files."""
    store, info = _saved(tmp_path)
    if what == ".":  # the step directory itself
        real = tmp_path / "elsewhere"
        info.path.rename(real)
        info.path.symlink_to(real, target_is_directory=True)
    else:
        real = tmp_path / "elsewhere" / Path(what).name
        real.parent.mkdir()
        (info.path / what).rename(real)
        (info.path / what).symlink_to(real, target_is_directory=real.is_dir())
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        store.load_engine(make_engine(seed=1), store.latest())  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        store.load_rank_state(store.latest(), 0)  # type: ignore[arg-type]


def test_deepspeed_reads_its_files_weights_only(
    tmp_path: Path, gloo_world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With verification and the scan out of the way (e.g. a file swapped in after they ran),
    DeepSpeed's own loads still refuse a malicious pickle instead of running it."""
    store, info = _saved(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"module": _Payload(marker)}, info.path / MODEL_STATES)
    monkeypatch.setattr(store, "verify", lambda info: None)
    monkeypatch.setattr(store, "scan_pickles", lambda info: None)
    fresh = make_engine(seed=1)
    with pytest.raises(CheckpointError, match="weights-only"):
        store.load_engine(fresh, store.latest())  # type: ignore[arg-type]
    assert not marker.exists(), "DeepSpeed unpickled its file with full pickle"
    assert "load" not in vars(fresh.checkpoint_engine)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in __import__("os").environ
