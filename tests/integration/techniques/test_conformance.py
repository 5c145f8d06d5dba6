"""One conformance suite over every technique of the catalog (listing one covers it).

Every catalog entry (orchestrator/recipe/catalog.py) has a builder in the registry and
every builder a catalog entry. Each technique, with its catalog example config on a tiny
model:
- survives a state_dict round trip,
- resumes bit-for-bit in fp32 (N steps straight == N/2 + checkpoint + resume + N/2),
- changes nothing when ``enabled: false`` (same weights as a run without it),
- rejects bad config with a RecipeError naming its key,
- declares exactly the capabilities whose hooks it implements.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe
from orchestrator.engine.loop import Trainer, WorkerContext
from orchestrator.errors import RecipeError
from orchestrator.recipe.catalog import CATALOG, config_of
from orchestrator.techniques.base import CAPABILITY_HOOKS, Capability, overrides
from orchestrator.techniques.registry import BUILDERS, build_techniques, registered, spec_of

SPECS = registered()
STEPS = 6
pytestmark = pytest.mark.integration  # the resume and enabled: false checks run DeepSpeed


def _recipe(tmp_path: Path, spec, cfg: dict) -> object:
    section = (
        {"techniques": {spec.name: cfg}} if spec.section == "techniques" else {spec.section: cfg}
    )
    return tiny_recipe(
        tmp_path, schedule={"steps": STEPS}, checkpoint={"every": STEPS // 2}, **section
    )


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.built.engine.module.state_dict().items()}


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_state_dict_round_trip(spec, tmp_path):
    recipe = _recipe(tmp_path, spec, spec.example)
    (technique,) = [t for t in build_techniques(recipe) if t.name == spec.name]
    state = technique.state_dict()
    (fresh,) = [t for t in build_techniques(recipe) if t.name == spec.name]
    fresh.load_state_dict(state)
    assert repr(fresh.state_dict()) == repr(state)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_resume_is_bit_for_bit(spec, tmp_path, gloo_world):
    recipe = _recipe(tmp_path, spec, spec.example)
    straight = Trainer(recipe, WorkerContext(run_dir=tmp_path / "straight"))
    straight.run()
    Trainer(recipe, WorkerContext(run_dir=tmp_path / "split", stop_after_steps=STEPS // 2)).run()
    resumed = Trainer(recipe, WorkerContext(run_dir=tmp_path / "split"))
    resumed.run()
    assert resumed.events[0]["kind"] == "resume" and resumed.events[0]["from_step"] == STEPS // 2
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), f"{spec.name}: resumed weights differ"


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_disabled_has_no_effect(spec, tmp_path, gloo_world):
    disabled = Trainer(
        _recipe(tmp_path, spec, {**spec.example, "enabled": False}),
        WorkerContext(run_dir=tmp_path / "off"),
    )
    disabled.run()
    assert not any(t.name == spec.name for t in disabled.techniques)
    baseline = Trainer(
        tiny_recipe(tmp_path, schedule={"steps": STEPS}, checkpoint={"every": STEPS // 2}),
        WorkerContext(run_dir=tmp_path / "base"),
    )
    baseline.run()
    a, b = _weights(disabled), _weights(baseline)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_bad_config_is_rejected_with_its_key(spec, tmp_path):
    with pytest.raises(RecipeError) as info:
        _recipe(tmp_path, spec, {**spec.example, "no_such_option": 1})
    keys = [p.key for p in info.value.problems]
    prefix = f"techniques.{spec.name}" if spec.section == "techniques" else spec.section
    assert f"{prefix}.no_such_option" in keys, keys


def test_catalog_and_registry_list_the_same_techniques():
    assert sorted(BUILDERS) == sorted(e.name for e in CATALOG)
    assert [s.entry for s in SPECS] == list(CATALOG)  # in run order, each its own entry


@pytest.mark.parametrize("entry", CATALOG, ids=[e.name for e in CATALOG])
def test_every_catalog_entry_builds_its_technique(entry, tmp_path):
    spec = spec_of(entry.name)
    recipe = _recipe(tmp_path, spec, entry.example)
    cfg = config_of(entry, recipe)
    assert isinstance(cfg, entry.config)
    assert spec.build(cfg, recipe).name == entry.name


DECIDING = {Capability.DECIDES_BEFORE_STEP, Capability.DECIDES_AFTER_STEP}


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_declared_capabilities_match_the_hooks(spec, tmp_path):
    """A capability's hook is overridden iff it is declared; a deciding hook may also be
    overridden for its side effects (the loop then rejects anything but PROCEED from it)."""
    recipe = _recipe(tmp_path, spec, spec.example)
    (technique,) = [t for t in build_techniques(recipe) if t.name == spec.name]
    for capability, hook in CAPABILITY_HOOKS.items():
        declared, implemented = capability in technique.capabilities, overrides(technique, hook)
        if capability in DECIDING:
            assert implemented or not declared, f"{spec.name}: declares {capability} only"
        else:
            assert declared == implemented, f"{spec.name}: {capability} vs {hook}"
    for duck in ("restore_on_rollback", "rollback_to", "stop_reason", "skip_request"):
        assert not hasattr(technique, duck), f"{spec.name}: duck-typed {duck}"
