"""SGG through the Trainer: resume is bit-for-bit under ZeRO 0-2 and ZeRO clusters one layer at
a time (moved from tests/unit/techniques/test_sgg.py: each runs DeepSpeed for seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe
from orchestrator.engine.loop import Trainer, WorkerContext
from orchestrator.techniques.sgg import SGGOptimizer

pytestmark = pytest.mark.integration


STEPS = 8


def _recipe(tmp_path: Path, stage: int):
    return tiny_recipe(
        tmp_path,
        schedule={"steps": STEPS},
        checkpoint={"every": STEPS // 2},
        techniques={
            "sgg": {"recluster_interval": 3, "scale_decay": 0.5},
            "warmup": {"warmup_steps": 2},
        },
        deepspeed={"zero_optimization": {"stage": stage}},
    )


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.built.engine.module.state_dict().items()}


def _sgg(trainer: Trainer) -> SGGOptimizer:
    (tech,) = [t for t in trainer.techniques if t.name == "sgg"]
    return tech.wrapper


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_resume_is_bit_for_bit(stage, tmp_path, gloo_world):
    """Reclusters at 3 and 6; the checkpoint at 4 sits between them: labels/factors travel."""
    recipe = _recipe(tmp_path, stage)
    straight = Trainer(recipe, WorkerContext(run_dir=tmp_path / "straight"))
    straight.run()
    assert all(g["sgg_reclusters"] == 2 for g in _sgg(straight).param_groups if g["sgg"])
    Trainer(recipe, WorkerContext(run_dir=tmp_path / "split", stop_after_steps=STEPS // 2)).run()
    resumed = Trainer(recipe, WorkerContext(run_dir=tmp_path / "split"))
    resumed.run()
    assert resumed.events[0]["kind"] == "resume"
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), f"stage {stage}: resumed weights differ"
    sa, sb = _sgg(straight), _sgg(resumed)
    for ga, gb in zip(sa.param_groups, sb.param_groups, strict=False):
        for pa, pb in zip(ga["params"], gb["params"], strict=False):
            for key in ("sgg_labels", "sgg_scale", "sgg_centroids"):
                if key in sa.state[pa]:
                    assert torch.equal(sa.state[pa][key], sb.state[pb][key]), key
    # SGG really acted: the factors moved away from 1 and the weights differ from plain AdamW
    scales = torch.cat(
        [sa.state[p]["sgg_scale"] for g in sa.param_groups if g["sgg"] for p in g["params"]]
    )
    assert not torch.allclose(scales, torch.ones_like(scales))


@pytest.mark.parametrize("stage", [1, 2])
def test_clustering_sees_one_layer_at_a_time_under_zero(stage, tmp_path, gloo_world, monkeypatch):
    seen: list[tuple[int, int]] = []
    original = SGGOptimizer.recluster

    def spy(self, p, moment, **kwargs):
        groups = self.inner.param_groups
        seen.append((p.numel(), len(groups)))
        return original(self, p, moment, **kwargs)

    monkeypatch.setattr(SGGOptimizer, "recluster", spy)
    recipe = _recipe(tmp_path, stage)
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"))
    trainer.run()
    engine = trainer.built.engine
    zero_opt = engine.optimizer
    assert type(zero_opt).__name__ == "DeepSpeedZeroOptimizer"
    wrapper = _sgg(trainer)
    assert zero_opt.optimizer is wrapper
    layers = [p for p in trainer.model.parameters() if p.dim() >= 2]
    sgg_groups = [g for g in wrapper.param_groups if g["sgg"]]
    assert len(sgg_groups) == len(layers)
    # the optimizer holds ZeRO's flat fp32 partition, one per group, as large as its one layer
    for group, layer in zip(sgg_groups, layers, strict=False):
        (flat,) = group["params"]
        assert (
            flat.dim() == 1
            and flat.numel() == layer.numel()
            and flat.data_ptr() != layer.data_ptr()
        )
    # ZeRO steps one param group at a time: every recluster saw exactly one layer's elements
    assert seen and all(n_groups == 1 for _, n_groups in seen)
    assert sorted(n for n, _ in seen[: len(layers)]) == sorted(p.numel() for p in layers)
    # the checkpoint's base optimizer state carries SGG's keys
    ckpt = Path(trainer.store.latest(None).path)
    files = list(ckpt.rglob("*optim_states.pt"))
    assert files, list(ckpt.rglob("*"))
    sd = torch.load(files[0], map_location="cpu", weights_only=False)
    base = sd["optimizer_state_dict"]["base_optimizer_state"]
    keys = set().union(*(s.keys() for s in base["state"].values()))
    assert {"sgg_labels", "sgg_scale", "sgg_centroids", "sgg_counts", "sgg_mda"} <= keys
    assert any(
        s["sgg_labels"].dtype == torch.uint8 for s in base["state"].values() if "sgg_labels" in s
    )
