"""LISA's layer broadcast and the spike guard's gradient all-reduce through the forced
world-1 path (gloo): the collective really runs, its result decides, and forcing it changes
nothing when every rank agrees. The GPU tests take the same path on NCCL."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_recipe
from orchestrator import distributed as D
from orchestrator.engine.loop import Trainer, WorkerContext

LAYERS = 4
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
GUARD = {"window": 16, "min_history": 4, "patience": 2, "good_after": 1, "skip_batches": 2}
GUARD |= {"grad_norm_zscore": False}


class Recorder:
    """Stands in for one torch.distributed collective: notes each tensor, then calls ``fn``."""

    def __init__(self, fn: Any):
        self.fn = fn
        self.seen: list[tuple[torch.device, torch.dtype, tuple[int, ...]]] = []

    def __call__(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.seen.append((tensor.device, tensor.dtype, tuple(tensor.shape)))
        return self.fn(tensor, *args, **kwargs)


def _lisa_recipe(tmp_path: Path) -> Any:
    return tiny_recipe(
        tmp_path,
        model={"config": {"num_hidden_layers": LAYERS}},
        schedule={"steps": 6},
        checkpoint={"every": 3},
        techniques={"lisa": {"gamma": 2, "interval": 2}},
    )


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.built.engine.module.state_dict().items()}


KEYS = ("kind", "step", "at_step", "interval", "layers", "detector", "signal", "to_step")


def _events(summary: dict[str, Any], *kinds: str) -> list[dict[str, Any]]:
    """The events of ``kinds``, without timings and values that differ run to run (NaN)."""
    return [{k: e[k] for k in KEYS if k in e} for e in summary["events"] if e["kind"] in kinds]


def test_lisa_trains_the_layers_rank_zero_broadcast(
    tmp_path: Path, gloo_world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0's list rules: whatever the broadcast delivers is what trains."""

    real = torch.distributed.broadcast

    def rank_zero_drew(tensor: torch.Tensor, src: int = 0, **kwargs: Any) -> Any:
        if tensor.dtype != torch.int64 or tuple(tensor.shape) != (2,):
            return real(tensor, src, **kwargs)  # DeepSpeed's own broadcasts
        assert src == 0
        tensor.copy_(torch.tensor([0, 3]))
        return None

    monkeypatch.setattr(D.dist, "broadcast", rank_zero_drew)
    trainer = Trainer(_lisa_recipe(tmp_path), WorkerContext(run_dir=tmp_path / "run"))
    with D.force_collectives():
        summary = trainer.run()
    switches = [e["layers"] for e in _events(summary, "lisa_switch")]
    assert switches and all(layers == [0, 3] for layers in switches)
    trains = {
        int(m.group(1))
        for n, p in trainer.built.engine.module.named_parameters()
        if p.requires_grad and (m := _LAYER_RE.search(n))
    }
    assert trains == {0, 3}


def _guard_recipe(tmp_path: Path, faults: dict[str, Any] | None = None) -> Any:
    sections: dict[str, Any] = {
        "schedule": {"steps": 6},
        "checkpoint": {"every": 2},
        "stability": GUARD,
    }
    if faults:
        sections["techniques"] = {"fault_injection": faults}
    return tiny_recipe(tmp_path, **sections)


def test_spike_guard_reduce_forced_at_world_one_gives_the_same_verdict(
    tmp_path: Path, gloo_world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults = {"nan_at_step": 3}
    plain = Trainer(_guard_recipe(tmp_path, faults), WorkerContext(run_dir=tmp_path / "plain"))
    plain_summary = plain.run()
    spy = Recorder(torch.distributed.all_reduce)
    monkeypatch.setattr(D.dist, "all_reduce", spy)
    forced = Trainer(_guard_recipe(tmp_path, faults), WorkerContext(run_dir=tmp_path / "forced"))
    with D.force_collectives():
        forced_summary = forced.run()
    norm_flags = [s for s in spy.seen if s == (torch.device("cpu"), torch.float64, (2,))]
    assert len(norm_flags) >= 6  # one per step at least
    (spike,) = _events(forced_summary, "spike")
    assert spike["detector"] == "nan" and spike["at_step"] == 3
    assert _events(forced_summary, "spike", "rollback") == _events(
        plain_summary, "spike", "rollback"
    )
    assert forced_summary["skipped_steps"] == plain_summary["skipped_steps"] == 1
    a, b = _weights(plain), _weights(forced)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_spike_guard_skips_when_another_rank_sees_a_nan(
    tmp_path: Path, gloo_world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verdict follows the reduced norm: a NaN on another rank skips the step here too."""
    calls = {"n": 0}
    real = torch.distributed.all_reduce

    def other_rank_nan_at_third_step(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = real(tensor, *args, **kwargs)
        if tensor.dtype == torch.float64 and tuple(tensor.shape) == (2,):
            calls["n"] += 1
            if calls["n"] == 4:  # step index 3 (the 4th gradient check)
                tensor[0] += float("nan")
        return out

    monkeypatch.setattr(D.dist, "all_reduce", other_rank_nan_at_third_step)
    trainer = Trainer(_guard_recipe(tmp_path), WorkerContext(run_dir=tmp_path / "run"))
    with D.force_collectives():
        summary = trainer.run()
    (spike,) = _events(summary, "spike")
    assert spike == {**spike, "detector": "nan", "signal": "grad_norm", "at_step": 3}
    assert summary["skipped_steps"] == 1 and summary["rollbacks"] == 0


def test_sgg_partitioned_median_pools_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ZeRO each rank holds some layers: D* is the median over the gathered MDAs."""
    from orchestrator.techniques.sgg import SGGConfig, SGGOptimizer

    gen = torch.Generator().manual_seed(0)
    moment = torch.randn(64, generator=gen) * torch.logspace(-3, 1, 64)
    p = torch.nn.Parameter(torch.zeros(64))
    cfg = SGGConfig(clusters=3, scale_decay=0.0)
    opt = SGGOptimizer(
        torch.optim.AdamW([{"params": [p], "sgg": True}], lr=1e-2), cfg, partitioned=True
    )
    opt.recluster(p, moment)
    mine = opt.state[p]["sgg_mda"].float().clone()
    other = torch.full_like(mine, 1e3)  # rank 1's layers: far larger deviations
    gathered: list[torch.Tensor] = []

    def two_ranks(out: list[torch.Tensor], tensor: torch.Tensor, **kwargs: Any) -> None:
        assert len(out) == 2 and tensor.device.type == "cpu"
        out[0].copy_(tensor)
        out[1].copy_(other)
        gathered.append(tensor)

    monkeypatch.setattr(D, "world", lambda: D.World(0, 2, "gloo"))
    monkeypatch.setattr(D.dist, "all_gather", two_ranks)
    opt.param_groups[0]["sgg_pending"] = True
    opt.finalize()
    assert gathered and torch.equal(gathered[0], mine)
    pool = sorted(torch.cat([mine, other]).tolist())
    d_star = pool[(len(pool) - 1) // 2]  # the lower median over both ranks
    want = (d_star / (mine + cfg.eps)).clamp(cfg.scale_min, cfg.scale_max)
    assert torch.allclose(opt.state[p]["sgg_scale"].float(), want)
    local = sorted(mine.tolist())[(len(mine) - 1) // 2]
    assert d_star != local  # the pooled median really differs from this rank's own


def test_indicator_reduces_forced_at_world_one_give_the_same_metrics(
    tmp_path: Path, gloo_world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leading indicators' per-layer sums go through the all-reduce helper too."""
    guard = {**GUARD, "indicators_every": 1}
    faults = {"spike_at_step": 4, "spike_factor": 100.0}

    def run(name: str) -> dict[str, Any]:
        recipe = tiny_recipe(
            tmp_path,
            schedule={"steps": 6},
            checkpoint={"every": 2},
            stability=guard,
            techniques={"fault_injection": faults},
        )
        return Trainer(recipe, WorkerContext(run_dir=tmp_path / name)).run()

    plain = run("plain")
    spy = Recorder(torch.distributed.all_reduce)
    monkeypatch.setattr(D.dist, "all_reduce", spy)
    with D.force_collectives():
        forced = run("forced")
    shapes = {s[2] for s in spy.seen if s[:2] == (torch.device("cpu"), torch.float64)}
    assert (2,) in shapes and any(len(s) == 2 and s[1] == 2 for s in shapes), shapes
    kinds = ("spike", "rollback", "indicator_warning", "indicator_unavailable")
    assert _events(forced, *kinds) == _events(plain, *kinds)
    assert forced["final_loss"] == plain["final_loss"]
