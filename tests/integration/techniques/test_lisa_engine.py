"""LISA: exactly the sampled layers train, optimizer state covers only them, resume continues
(DeepSpeed runs under ZeRO 0-2; the checks without an engine are in
tests/unit/techniques/test_lisa_config.py)."""

from __future__ import annotations

import re

import pytest
import torch
from unit.techniques.test_lisa_config import LAYERS, lisa_recipe

from orchestrator.engine.loop import Trainer, WorkerContext
from orchestrator.techniques.lisa import LisaConfig, _torch_optimizer, sample_layers

pytestmark = pytest.mark.integration

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


class Recording(Trainer):
    """A Trainer that notes, for every step, which parts of the model changed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record: list[dict] = []

    def run_step(self):
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        metrics = super().run_step()
        changed = {n for n, p in self.model.named_parameters() if not torch.equal(p, before[n])}
        lisa = next(t for t in self.techniques if t.name == "lisa")
        self.record.append(
            {
                "step": self.state.step,
                "layers": {int(m.group(1)) for n in changed if (m := _LAYER_RE.search(n))},
                "outside": {n for n in changed if not _LAYER_RE.search(n)},
                "active": list(lisa.active),
                "bytes": metrics["lisa/optimizer_state_bytes"],
                "freed": metrics.get("lisa/old_state_freed"),
            }
        )
        return metrics


def _numel(model: torch.nn.Module, layer: int | None) -> int:
    """Elements of one layer (``layer``) or of everything outside the layers (None)."""
    total = 0
    for n, p in model.named_parameters():
        m = _LAYER_RE.search(n)
        if (layer is None and m is None) or (m is not None and int(m.group(1)) == layer):
            total += p.numel()
    return total


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_exactly_the_sampled_layers_train_and_state_tracks_them(zero, tmp_path, gloo_world):
    recipe = lisa_recipe(tmp_path, zero=zero)
    trainer = Recording(recipe, WorkerContext(run_dir=tmp_path / "run"))
    trainer.run()
    cfg = LisaConfig(gamma=2, interval=2)
    outside = {n for n, _ in trainer.model.named_parameters() if not _LAYER_RE.search(n)}
    per_interval = [sample_layers(cfg, LAYERS, recipe.seed, i) for i in range(4)]
    assert len({tuple(x) for x in per_interval}) > 1  # the test really sees switches
    for rec in trainer.record:
        expected = per_interval[(rec["step"] - 1) // 2]
        assert rec["active"] == expected
        assert rec["layers"] == set(expected), rec
        assert rec["outside"] == outside, rec  # embeddings, head and final norm train every step
    # optimizer state = (moments [+ fp32 master under ZeRO]) of the active set only, never growing
    per_elem = 8 if zero == 0 else 12
    for rec in trainer.record:
        active = _numel(trainer.model, None) + sum(_numel(trainer.model, i) for i in rec["active"])
        assert active * per_elem <= rec["bytes"] <= active * per_elem * 1.02, rec
    full = sum(p.numel() for p in trainer.model.parameters()) * per_elem
    assert max(r["bytes"] for r in trainer.record) < 0.8 * full
    assert max(r["bytes"] for r in trainer.record) <= trainer.record[0]["bytes"] * 1.001
    switches = [r for r in trainer.record if r["freed"] is not None]
    assert switches and all(r["freed"] == 1.0 for r in switches)  # the old optimizer is gone
    # embeddings/head/norm keep their moments across switches; a layer's start afresh
    inner = _torch_optimizer(trainer.built.engine.optimizer)
    steps = [int(inner.state[g["params"][0]]["step"]) for g in inner.param_groups]
    assert steps[0] == 8 and max(steps[1:]) < 8, steps
    events = [e for e in trainer.events if e["kind"] == "lisa_switch"]
    assert [e["layers"] for e in events] == [
        x for i, x in enumerate(per_interval) if i == 0 or x != per_interval[i - 1]
    ]


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_resume_mid_interval_is_bit_for_bit(zero, tmp_path, gloo_world):
    recipe = lisa_recipe(
        tmp_path, zero=zero, steps=9, every=4, interval=3
    )  # checkpoint at 4: mid-interval
    straight = Recording(recipe, WorkerContext(run_dir=tmp_path / "straight"))
    straight.run()
    Trainer(recipe, WorkerContext(run_dir=tmp_path / "split", stop_after_steps=4)).run()
    resumed = Recording(recipe, WorkerContext(run_dir=tmp_path / "split"))
    resumed.run()
    assert resumed.events[0]["kind"] == "resume" and resumed.events[0]["from_step"] == 4
    assert [r["active"] for r in resumed.record] == [r["active"] for r in straight.record][4:]
    assert [r["layers"] for r in resumed.record] == [r["layers"] for r in straight.record][4:]
    a = straight.built.engine.module.state_dict()
    b = resumed.built.engine.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
