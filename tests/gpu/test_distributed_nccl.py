"""orchestrator.distributed on a real NCCL group: CPU tensors in, CUDA on the wire, results
back on the caller's device; and a raw CPU tensor on NCCL is refused.

Two NCCL ranks cannot share the one lent GPU, so this is an NCCL world of one process with
every collective forced (``force_collectives``): the same code path as eight GPUs.

    DS_ACCELERATOR=cuda python -m pytest -m gpu tests/gpu/test_distributed_nccl.py
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from conftest import gpu_only
from orchestrator import distributed as D

pytestmark = gpu_only()


def test_cpu_tensors_go_through_nccl_and_come_back(
    nccl_world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.device] = []
    real = dist.all_reduce

    def spy(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(tensor.device)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(D.dist, "all_reduce", spy)
    assert D.collective_device() == torch.device("cuda", 0)
    with D.force_collectives():
        t = torch.tensor([1.0, 2.0])
        assert D.all_reduce_(t, "max") is t and t.device.type == "cpu"
        assert D.all_reduce_floats([0.5, 3.0]) == [0.5, 3.0]
        b = D.broadcast_(torch.tensor([4, -1]), src=0)
        assert b.device.type == "cpu" and b.tolist() == [4, -1]
        (g,) = D.all_gather_tensor(torch.tensor([7.0]))
        assert g.device.type == "cpu" and g.tolist() == [7.0]
        cuda = torch.ones(3, device="cuda")
        assert D.all_reduce_(cuda) is cuda
        assert D.all_gather_objects({"a": 1}) == [{"a": 1}]
        assert D.broadcast_object(("x", 1)) == ("x", 1)
    assert seen and all(d == torch.device("cuda", 0) for d in seen)


def test_raw_cpu_tensor_on_nccl_is_what_the_helper_prevents(nccl_world: None) -> None:
    """NCCL itself rejects a CPU tensor: the failure every technique had before the helper."""
    with pytest.raises((RuntimeError, ValueError)):
        dist.all_reduce(torch.zeros(2))
    with pytest.raises(D.CollectiveDeviceError):
        D._check_device(torch.zeros(2), D.world())
