"""The RNG part of a checkpoint: CPU generators always, every CUDA device's when CUDA is in
use; CPU checkpoints load on GPU processes and GPU checkpoints on CPU ones.

CUDA is faked where a test needs it (this machine has none); tests/gpu/test_gpu_ready.py
resumes bit-exactly with dropout on a real GPU."""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import pytest
import torch

from orchestrator.engine.checkpoint.safety import check_weights_only, load_weights_only
from orchestrator.engine.recovery import rng_state, set_rng_state


def _through_a_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """What a resume reads back: the rank state as the store writes and loads it."""
    check_weights_only(state, "rank state")
    buf = io.BytesIO()
    torch.save(state, buf)
    return load_weights_only(buf.getvalue())


def _draws() -> tuple[list[float], float, float]:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, devices: int) -> dict[int, torch.Tensor]:
    """A CUDA runtime of ``devices`` generators held in a dict (index -> state)."""
    gens = {i: torch.full((16,), i + 1, dtype=torch.uint8) for i in range(devices)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [gens[i] for i in sorted(gens)])

    def set_state(state: torch.Tensor, device: int) -> None:
        gens[device] = state.clone()

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    return gens


def test_cpu_payload_round_trips_through_a_checkpoint() -> None:
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    saved = _through_a_checkpoint(rng_state())
    assert "cuda" not in saved  # CUDA not initialised in this process
    want = _draws()
    _draws()
    set_rng_state(saved)
    assert _draws() == want


def test_every_cuda_device_is_saved_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    gens = _fake_cuda(monkeypatch, devices=2)
    saved = _through_a_checkpoint(rng_state())
    assert [t.tolist() for t in saved["cuda"]] == [[1] * 16, [2] * 16]
    gens[0], gens[1] = torch.zeros(16, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8)
    set_rng_state(saved)
    assert gens[0].tolist() == [1] * 16 and gens[1].tolist() == [2] * 16


def test_cpu_checkpoint_loads_on_a_gpu_process(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_saved = _through_a_checkpoint(rng_state())
    gens = _fake_cuda(monkeypatch, devices=1)
    set_rng_state(cpu_saved)  # no CUDA part: the CUDA generator keeps its seeded state
    assert gens[0].tolist() == [1] * 16


def test_gpu_checkpoint_loads_on_a_cpu_process_and_on_fewer_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with monkeypatch.context() as m:
        _fake_cuda(m, devices=2)
        gpu_saved = _through_a_checkpoint(rng_state())
    assert len(gpu_saved["cuda"]) == 2
    set_rng_state(gpu_saved)  # CPU only: the CUDA part is ignored, the CPU part restored
    assert torch.equal(torch.get_rng_state(), gpu_saved["torch"])
    gens = _fake_cuda(monkeypatch, devices=1)  # one visible device (a Ray GPU worker)
    set_rng_state(gpu_saved)
    assert sorted(gens) == [0] and gens[0].tolist() == [1] * 16
