"""Twelve HF model types built by `kind: hf_config` train a few steps each under LISA and a
dropout schedule, with gradient checkpointing on: LISA finds each layout's blocks (which
layers' weights changed), the schedule drives each one's dropout (the rate at step k, and
by effect: train-mode forwards differ at rate r and agree at rate 0). Two of them also run
on two Ray workers. The validation of the same configs is in
tests/unit/recipe/test_hf_models.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from unit.engine.test_models import checkpointing
from unit.recipe.test_hf_models import ARCHITECTURES, D

from conftest import tiny_recipe
from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
from orchestrator.engine.models import build_model
from orchestrator.techniques.lisa import LisaConfig, sample_layers

pytestmark = pytest.mark.integration

STEPS, CUTOFF = 4, 2  # early dropout: rate D for steps 0-1, then 0
LAYOUT = {  # where each architecture keeps its blocks (LISA's discovery)
    "gpt2": "transformer.h",
    "falcon": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}
LISA = {"gamma": 1, "interval": STEPS}  # one interval: one layer trains all run


def arch_recipe(tmp_path: Path, arch: str, **sections: Any) -> Any:
    """The tiny recipe with ``arch``'s tiny config, LISA, early dropout and checkpointing."""
    model = {
        "kind": "hf_config",
        "architecture": arch,
        "config": ARCHITECTURES[arch],
        "gradient_checkpointing": True,
    }
    techniques = {
        "lisa": LISA,
        "dropout": {"mode": "early", "schedule": "constant", "rate": D, "cutoff_steps": CUTOFF},
    }
    defaults: dict[str, Any] = {
        "data": {"seq_len": 16},
        "schedule": {"steps": STEPS, "micro_batch_size": 2},
        "checkpoint": {"every": 0, "at_end": False},
        "techniques": techniques,
    }
    return tiny_recipe(tmp_path, replace={"model": model}, **{**defaults, **sections})


def site_rates(trainer: Trainer) -> set[float]:
    """Every rate the dropout schedule's sites hold now."""
    schedule = next(t for t in trainer.techniques if t.name == "dropout")
    sites = schedule.sites
    rates = {round(float(m.p), 6) for m in sites.modules}
    rates |= {round(float(getattr(o, a)), 6) for o, a in sites.attrs + sites.configs}
    return rates


class Watch(StepHook):
    """The sites' rates during each step."""

    def __init__(self) -> None:
        self.rates: dict[int, set[float]] = {}

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.rates[trainer.state.step - 1] = site_rates(trainer)


def changed_layers(before: dict[str, torch.Tensor], model: torch.nn.Module, path: str) -> set[int]:
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
    return {
        int(m.group(1))
        for n, p in model.named_parameters()
        if (m := pattern.match(n)) and not torch.equal(before[n], p.detach())
    }


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_trains_with_lisa_and_scheduled_dropout(arch, tmp_path, gloo_world):
    recipe = arch_recipe(tmp_path, arch)
    watch = Watch()
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"), step_hooks=[watch])
    before = {n: p.detach() for n, p in build_model(recipe.model, recipe.seed).named_parameters()}
    trainer.run()
    model = trainer.model
    assert trainer.state.step == STEPS
    assert model.config._attn_implementation == "sdpa"
    assert checkpointing(model), arch

    lisa = next(t for t in trainer.techniques if t.name == "lisa")
    path = LAYOUT.get(arch, "model.layers")
    assert lisa.cfg.layers_path is None and lisa.n_layers == 2
    expected = sample_layers(LisaConfig(**LISA), 2, recipe.seed, 0)
    assert changed_layers(before, model, path) == set(expected), arch

    assert watch.rates == {k: {D if k < CUTOFF else 0.0} for k in range(STEPS)}, arch
    schedule = next(t for t in trainer.techniques if t.name == "dropout")
    x = torch.randint(0, 256, (2, 16))
    model.train()
    schedule.apply(STEPS - 1, STEPS)  # rate 0: every site off, train mode is deterministic
    assert torch.equal(_forward(model, x), _forward(model, x)), arch
    schedule.apply(0, STEPS)  # rate D: the sites really drop
    assert not torch.equal(_forward(model, x), _forward(model, x)), arch


def _model_states(step_dir: Path) -> dict[str, torch.Tensor]:
    path = step_dir / "ds" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False, map_location="cpu")["module"]


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_two_workers_train_the_sampled_layer(arch, tmp_path, ray_local):
    from orchestrator.control.controller import run_job
    from orchestrator.recipe.jobspec import JobSpec

    recipe = arch_recipe(
        tmp_path,
        arch,
        checkpoint={"every": STEPS, "keep": 0},
        resources={"workers": 2, "max_restarts": 0},
        deepspeed={"zero_optimization": {"stage": 1}},
    )
    result = run_job(JobSpec.of(arch, recipe))
    assert result.status == "FINISHED", result.error
    final = _model_states(Path(result.checkpoint))
    initial = build_model(recipe.model, recipe.seed).state_dict()
    path = LAYOUT[arch]
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
    changed = {
        int(m.group(1))
        for n, v in final.items()
        if (m := pattern.match(n)) and not torch.equal(initial[n], v)
    }
    assert changed == set(sample_layers(LisaConfig(**LISA), 2, recipe.seed, 0))
