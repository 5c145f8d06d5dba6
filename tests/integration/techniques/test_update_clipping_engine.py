"""Update clipping through the Trainer on real DeepSpeed CPU engines (gloo, world 1): ZeRO-0
and ZeRO-2 clip the same tensors by the same factors, over three param groups, so they end
on the same weights; without clipping the weights differ (it acted under ZeRO-2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_recipe
from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
from orchestrator.techniques.base import Capability, Setup, Technique
from orchestrator.techniques.registry import build_techniques
from orchestrator.techniques.update_clipping import UpdateClipper

pytestmark = pytest.mark.integration

STEPS = 6
BLOWUP = 3


class ThreeGroups(Technique):
    """Splits the one param group into three with their own LR multipliers."""

    name = "three_groups"
    capabilities = frozenset({Capability.CONFIGURES})

    def configure(self, setup: Setup) -> None:
        params = [p for g in setup.param_groups for p in g["params"]]
        setup.param_groups = [
            {"params": params[i::3], "name": f"g{i}", "lr_multiplier": m}
            for i, m in enumerate((1.0, 0.5, 2.0))
        ]


class Metrics(StepHook):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def after_step(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.rows.append(dict(metrics))


def _run(tmp_path: Path, stage: int, clip: bool) -> tuple[dict[str, torch.Tensor], list[float]]:
    techniques: dict[str, Any] = {
        "fault_injection": {"grad_blowup_at_step": BLOWUP, "grad_factor": 100.0}
    }
    if clip:
        techniques["update_clipping"] = {}
    recipe = tiny_recipe(
        tmp_path,
        optimizer={"grad_clip": 0.0},  # the blown-up gradient reaches AdamW as it is
        schedule={"steps": STEPS},
        checkpoint={"every": 100},
        techniques=techniques,
        deepspeed={"zero_optimization": {"stage": stage}},
    )
    hook = Metrics()
    trainer = Trainer(
        recipe,
        WorkerContext(run_dir=tmp_path / f"z{stage}-{clip}"),
        step_hooks=[hook],
        techniques=[ThreeGroups(), *build_techniques(recipe)],
    )
    trainer.run()
    groups = trainer.built.optimizer.param_groups
    assert len(groups) == 3
    weights = {k: v.detach().clone() for k, v in trainer.built.engine.module.state_dict().items()}
    fractions = [r.get("update_clipping/clipped_fraction", -1.0) for r in hook.rows]
    return weights, fractions


def test_zero_0_and_zero_2_clip_alike(tmp_path, gloo_world):
    w0, f0 = _run(tmp_path, 0, clip=True)
    w2, f2 = _run(tmp_path, 2, clip=True)
    plain, _ = _run(tmp_path, 2, clip=False)
    assert f0 == pytest.approx(f2)  # the same tensors clipped at every step
    assert f0[BLOWUP] > 0.9  # the x100 gradient: (nearly) every tensor clipped
    for k in w0:
        torch.testing.assert_close(w0[k], w2[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(w2[k], plain[k], rtol=1e-3, atol=1e-4) for k in w2)


@pytest.mark.parametrize("stage", [0, 2])
def test_lisa_switches_clip_only_the_active_tensors(stage, tmp_path, gloo_world):
    """LISA rebuilds the engine on every switch; each build's clipper holds the tensors that
    optimizer holds (frozen layers have no state) and records every step."""
    recipe = tiny_recipe(
        tmp_path,
        schedule={"steps": STEPS},
        checkpoint={"every": 100},
        techniques={"lisa": {"gamma": 1, "interval": 2}, "update_clipping": {"max_rms": 0.5}},
        deepspeed={"zero_optimization": {"stage": stage}},
    )
    hook = Metrics()
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "lisa"), step_hooks=[hook])
    trainer.run()
    (tech,) = [t for t in trainer.techniques if t.name == "update_clipping"]
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    everything = list(trainer.model.parameters())
    assert tech.clipper is not None
    assert {id(p) for p in tech.clipper.tensors} == {id(p) for p in trainable}
    assert len(trainable) < len(everything)  # frozen layers are not there
    fractions = [r["update_clipping/clipped_fraction"] for r in hook.rows]
    assert len(fractions) == STEPS and max(fractions) > 0  # max_rms 0.5: it clips


def _sgg_run(tmp_path: Path, stage: int, clip: bool) -> tuple[dict[str, torch.Tensor], list]:
    techniques: dict[str, Any] = {"sgg": {"recluster_interval": 2, "scale_decay": 0.5}}
    if clip:
        techniques["update_clipping"] = {"max_rms": 0.5}
    recipe = tiny_recipe(
        tmp_path,
        schedule={"steps": STEPS},
        checkpoint={"every": 100},
        techniques=techniques,
        deepspeed={"zero_optimization": {"stage": stage}},
    )
    hook = Metrics()
    trainer = Trainer(
        recipe, WorkerContext(run_dir=tmp_path / f"sgg{stage}-{clip}"), step_hooks=[hook]
    )
    trainer.run()
    weights = {k: v.detach().clone() for k, v in trainer.built.engine.module.state_dict().items()}
    return weights, [r.get("update_clipping/clipped_fraction") for r in hook.rows]


@pytest.mark.parametrize("stage", [0, 2])
def test_it_clips_sggs_own_steps(stage, tmp_path, gloo_world, monkeypatch):
    """SGG steps its Adam groups itself (it never calls AdamW's step for them); clipping wraps
    SGG's step, so it still acts on them. (SGG's factors apply a step later under ZeRO by
    design, so stage 0 and stage 2 are compared each with its own unclipped run.)"""
    stepped: list[int] = []
    take = UpdateClipper.take_metrics

    def spy(self: UpdateClipper) -> dict[str, float]:
        stepped.append(self.stepped)  # tensors whose RMS was formed this step
        return take(self)

    monkeypatch.setattr(UpdateClipper, "take_metrics", spy)
    clipped, fractions = _sgg_run(tmp_path, stage, clip=True)
    plain, _ = _sgg_run(tmp_path, stage, clip=False)
    assert len(fractions) == STEPS and max(fractions) > 0
    n_tensors = len([p for p in clipped.values() if p.dtype.is_floating_point])
    assert stepped == [n_tensors] * STEPS  # SGG's layers too, not only its plain groups
    assert any(not torch.allclose(clipped[k], plain[k], rtol=1e-3, atol=1e-4) for k in plain)
