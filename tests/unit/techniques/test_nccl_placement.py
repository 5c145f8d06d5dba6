"""No CPU tensor reaches an NCCL collective from the call sites the issue named.

Before the communication helper, LISA's ``_sample`` broadcast and the spike guard's grad-norm
all-reduce handed CPU tensors straight to ``torch.distributed`` on an NCCL group (NCCL rejects
them; every test skipped the collective at world size 1). Here the world is a two-rank NCCL
group as the helper sees it, on a machine without CUDA: the backend fails the test if it is
given a CPU tensor, and moving a tensor to CUDA raises :class:`MovedToCuda`, the proof that
the helper placed it on the group's device first. tests/gpu/test_distributed_nccl.py runs the
same helper on a real NCCL group."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from orchestrator import distributed as D
from orchestrator.recipe.techniques.lisa import LisaConfig
from orchestrator.techniques.indicators import IndicatorProbe
from orchestrator.techniques.lisa import Lisa
from orchestrator.techniques.spike_guard import _pre_step_grad_norm


class MovedToCuda(Exception):
    """A tensor was about to move to CUDA (which this machine lacks)."""

    def __init__(self, tensor: torch.Tensor, device: torch.device):
        super().__init__(f"{tuple(tensor.shape)} {tensor.dtype} -> {device}")
        self.shape, self.dtype, self.device = tuple(tensor.shape), tensor.dtype, device


@pytest.fixture
def nccl_as_the_helper_sees_it(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """Rank 0 of 2 on NCCL with CUDA device 0; returns the devices the backend was given."""
    given: list[torch.device] = []
    monkeypatch.setattr(D, "world", lambda: D.World(0, 2, "nccl"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def backend(*args: Any, **kwargs: Any) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        given.extend(t.device for t in tensors)
        if any(t.device.type == "cpu" for t in tensors):
            pytest.fail("a CPU tensor reached an NCCL collective")

    for name in ("all_reduce", "broadcast", "all_gather"):
        monkeypatch.setattr(D.dist, name, backend)
    real_to = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        for a in (*args, *kwargs.values()):
            if isinstance(a, (torch.device, str)) and torch.device(a).type == "cuda":
                raise MovedToCuda(self, torch.device(a))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    return given


def test_lisa_sample_broadcast_moves_its_layers_to_cuda(
    nccl_as_the_helper_sees_it: list[torch.device],
) -> None:
    lisa = Lisa(LisaConfig(gamma=2, interval=2), seed=0)
    lisa.n_layers = 4
    with pytest.raises(MovedToCuda) as moved:
        lisa._sample(0)
    assert moved.value.shape == (2,) and moved.value.dtype == torch.int64
    assert moved.value.device == torch.device("cuda", 0)
    assert nccl_as_the_helper_sees_it == []  # the CPU list never reached the backend


def test_spike_guard_grad_norm_reduce_moves_to_cuda(
    nccl_as_the_helper_sees_it: list[torch.device],
) -> None:
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    with pytest.raises(MovedToCuda) as moved:
        _pre_step_grad_norm(model, world_size=2)
    assert moved.value.shape == (2,) and moved.value.dtype == torch.float64
    assert nccl_as_the_helper_sees_it == []


def test_indicator_sums_move_to_cuda(nccl_as_the_helper_sees_it: list[torch.device]) -> None:
    probe = IndicatorProbe(update_rms=True, tev=False, attn_entropy=False)
    probe.layers = ["layer.0", "layer.1"]
    with pytest.raises(MovedToCuda) as moved:
        probe.collect(torch.nn.Linear(2, 2))
    assert moved.value.shape == (2, 2) and moved.value.dtype == torch.float64
    assert nccl_as_the_helper_sees_it == []


def test_float_reductions_move_to_cuda(nccl_as_the_helper_sees_it: list[torch.device]) -> None:
    """The loss all-reduce, the agreed action and continual learning's eval sums."""
    with pytest.raises(MovedToCuda) as moved:
        D.all_reduce_floats([1.0, 2.0, 3.0], "max")
    assert moved.value.shape == (3,) and moved.value.dtype == torch.float64
    assert nccl_as_the_helper_sees_it == []
