"""orchestrator.distributed: forced world-1 collectives on gloo, the device per backend, the
guard in front of NCCL, and that no other module calls a collective itself."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from orchestrator import distributed as D

ROOT = Path(__file__).resolve().parents[2] / "orchestrator"
COLLECTIVE_CALL = re.compile(
    r"\b(dist|d|torch\.distributed)\.(all_reduce|broadcast|all_gather|all_gather_object|"
    r"broadcast_object_list|reduce_scatter|reduce|gather|scatter|all_to_all|barrier)\("
)
# Call sites other branches are moving onto orchestrator.distributed (remove at merge).
PENDING: set[str] = set()  # modules not yet switched (none)


class Spy:
    """Wraps a torch.distributed function, counting the calls and the devices it was given."""

    def __init__(self, real: Any):
        self.real = real
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch, gloo_world: None) -> dict[str, Spy]:
    out = {}
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_object"):
        spy = Spy(getattr(dist, name))
        monkeypatch.setattr(D.dist, name, spy)
        out[name] = spy
    spy = Spy(dist.broadcast_object_list)
    monkeypatch.setattr(D.dist, "broadcast_object_list", spy)
    out["broadcast_object_list"] = spy
    return out


def _run_all() -> dict[str, Any]:
    t = torch.tensor([1.0, 4.0])
    return {
        "floats": D.all_reduce_floats([1.5, 2.0], "max"),
        "reduce": D.all_reduce_(t, "sum"),
        "same": D.all_reduce_(t) is t,
        "bcast": D.broadcast_(torch.tensor([3, -1]), src=0).tolist(),
        "gather": [x.tolist() for x in D.all_gather_tensor(torch.tensor([7.0]))],
        "objects": D.all_gather_objects({"a": 1}),
        "object": D.broadcast_object(("x", 2), src=0),
    }


EXPECTED = {
    "floats": [1.5, 2.0],
    "same": True,
    "bcast": [3, -1],
    "gather": [[7.0]],
    "objects": [{"a": 1}],
    "object": ("x", 2),
}


def _check(values: dict[str, Any]) -> None:
    assert values["reduce"].tolist() == [1.0, 4.0]
    for key, want in EXPECTED.items():
        assert values[key] == want, key


def test_world_one_skips_the_backend_unless_forced(spies: dict[str, Spy]) -> None:
    assert D.world() == D.World(rank=0, size=1, backend="gloo")
    _check(_run_all())
    assert all(s.calls == 0 for s in spies.values())

    with D.force_collectives():
        assert D.forced()
        _check(_run_all())
    assert not D.forced()
    assert {n: s.calls for n, s in spies.items()} == {
        "all_reduce": 3,
        "broadcast": 1,
        "all_gather": 1,
        "all_gather_object": 1,
        "broadcast_object_list": 1,
    }


def test_non_contiguous_and_grad_tensors_are_reduced_in_place(
    gloo_world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("all_reduce", "broadcast", "all_gather"):
        real = getattr(dist, name)

        def contiguous_only(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            tensor = args[-1] if isinstance(args[-1], torch.Tensor) else args[0]
            assert tensor.is_contiguous(), "NCCL needs contiguous tensors"
            return _real(*args, **kwargs)

        monkeypatch.setattr(D.dist, name, contiguous_only)
    base = torch.arange(6, dtype=torch.float32).view(2, 3)
    t = base.t()  # a non-contiguous view: the backend gets a contiguous copy
    weight = torch.ones(3, 2, requires_grad=True)
    view = weight.t()  # copied back into a view of a leaf that requires grad
    with D.force_collectives():
        assert D.all_reduce_(t, "max") is t and torch.equal(base, torch.arange(6.0).view(2, 3))
        assert D.broadcast_(view) is view and torch.equal(weight, torch.ones(3, 2))
        assert [g.tolist() for g in D.all_gather_tensor(t)] == [t.tolist()]


def test_env_forces_collectives(spies: dict[str, Spy], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(D.FORCE_ENV, "1")
    assert D.forced()
    _check(_run_all())
    assert spies["all_reduce"].calls == 3
    monkeypatch.setenv(D.FORCE_ENV, "0")
    assert not D.forced()


def test_identity_without_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    assert D.world() == D.World() and not D.world().initialised
    with D.force_collectives():  # nothing to talk to: still the identity
        _check(_run_all())


def test_unknown_op_is_refused(gloo_world: None) -> None:
    with D.force_collectives(), pytest.raises(ValueError, match="unknown reduce op"):
        D.all_reduce_floats([1.0], "mean")  # type: ignore[arg-type]


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, index: int = 3) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: index)


def test_device_per_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert D.collective_device("gloo") == torch.device("cpu")
    assert D.collective_device("mpi") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(D.CollectiveDeviceError, match="needs CUDA"):
        D.collective_device("nccl")
    _fake_cuda(monkeypatch, 3)
    assert D.collective_device("nccl") == torch.device("cuda", 3)


def test_default_device_follows_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "world", lambda: D.World(0, 2, "nccl"))
    _fake_cuda(monkeypatch, 1)
    assert D.collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(D, "world", lambda: D.World(0, 2, "gloo"))
    assert D.collective_device() == torch.device("cpu")


@pytest.mark.parametrize(
    "call",
    [
        lambda t: D.all_reduce_(t),
        lambda t: D.all_reduce_floats([1.0, 2.0]),
        lambda t: D.broadcast_(t, 0),
        lambda t: D.all_gather_tensor(t),
    ],
    ids=["all_reduce_", "all_reduce_floats", "broadcast_", "all_gather_tensor"],
)
def test_guard_stops_a_cpu_tensor_before_nccl(monkeypatch: pytest.MonkeyPatch, call: Any) -> None:
    """A CPU tensor that somehow was not moved never reaches an NCCL collective."""
    monkeypatch.setattr(D, "world", lambda: D.World(0, 2, "nccl"))
    _fake_cuda(monkeypatch, 0)
    monkeypatch.setattr(D, "_on_group_device", lambda t, w: t)  # the bug the guard catches

    def backend(*args: Any, **kwargs: Any) -> None:
        pytest.fail("a CPU tensor reached the NCCL collective")

    for name in ("all_reduce", "broadcast", "all_gather"):
        monkeypatch.setattr(D.dist, name, backend)
    with pytest.raises(D.CollectiveDeviceError, match="cpu tensor .* nccl collective"):
        call(torch.zeros(2))


def test_guard_accepts_the_group_device(monkeypatch: pytest.MonkeyPatch) -> None:
    D._check_device(torch.zeros(1), D.World(0, 2, "gloo"))
    _fake_cuda(monkeypatch, 0)
    with pytest.raises(D.CollectiveDeviceError):
        D._check_device(torch.zeros(1), D.World(0, 2, "nccl"))
    with pytest.raises(D.CollectiveDeviceError):
        D._check_device(torch.zeros(1, device="meta"), D.World(0, 2, "gloo"))


def test_only_distributed_py_calls_collectives() -> None:
    """Every collective in the package goes through orchestrator.distributed."""
    found = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel != "distributed.py" and COLLECTIVE_CALL.search(path.read_text()):
            found.add(rel)
    assert found <= PENDING, f"call orchestrator.distributed instead: {sorted(found - PENDING)}"


def _imported_modules(source: str) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_other_module_imports_a_communication_library() -> None:
    """Nothing but orchestrator.distributed can reach torch.distributed or DeepSpeed's comm
    (not even under another name, which the call pattern above would miss); DeepSpeed's own
    collectives inside the engine are DeepSpeed's business."""
    banned = ("torch.distributed", "deepspeed.comm", "torch.cuda.nccl")
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        hits = {m for m in _imported_modules(path.read_text()) if m.startswith(banned)}
        if rel != "distributed.py" and hits:
            found[rel] = sorted(hits)
    assert not found, f"call orchestrator.distributed instead: {found}"
