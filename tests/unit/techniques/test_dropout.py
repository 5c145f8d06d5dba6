"""Dropout schedules: the rate *inside the model* at chosen steps, for every mode and schedule,
on HF LLaMA (attention-dropout floats), GPT-2 (nn.Dropout) and the builtin ViT (Dropout +
DropPath), across a resume and across engine rebuilds (every site kind keeps its site and
drop-path share; LISA's real rebuilds are in tests/integration/techniques/test_dropout_lisa.py),
plus the rate-0 model error and `regimen plan`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import TINY_RECIPE, tiny_recipe
from orchestrator.engine.loop import Trainer, WorkerContext
from orchestrator.engine.vision import DropPath, build_builtin
from orchestrator.errors import RecipeError, UsageError
from orchestrator.recipe.expand import Variant
from orchestrator.recipe.plan import plan_of
from orchestrator.techniques.base import Setup
from orchestrator.techniques.dropout import DropoutConfig, DropoutSchedule, scheduled_rate

STEPS = 8
R = 0.3
# (mode, schedule) -> the rate of steps 0..7 with rate 0.3 and a cut-off at step 4.
EXPECTED = {
    ("standard", "constant"): [R] * 8,
    ("early", "constant"): [R] * 4 + [0.0] * 4,
    ("early", "linear"): [0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # np.linspace(0.3, 0, 4)
    ("late", "constant"): [0.0] * 4 + [R] * 4,
    ("late", "linear"): [0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.3],
}


def _cfg(mode: str, schedule: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"mode": mode, "schedule": schedule, "rate": R, **extra}
    if mode != "standard":
        cfg.setdefault("cutoff_steps", 4)
    return cfg


def _vit_recipe(tmp_path: Path, **sections: Any) -> Any:
    """The tiny recipe with a 3-block ViT (width 32) on 8x8 digits."""
    vit = {
        "model": {"kind": "builtin", "architecture": "vit", "config": {"dim": 32, "depth": 3}},
        "data": {"kind": "digits", "eval_fraction": 0.1},
    }
    return tiny_recipe(tmp_path, replace=vit, **sections)


class Recording(Trainer):
    """Reads the rates inside the model during each step (after on_step_begin set them)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.seen: dict[int, dict[str, Any]] = {}

    def run_step(self) -> dict[str, float]:
        step = self.state.step
        original = self.task.loss

        def loss(engine: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            self.seen[step] = read_rates(self.model)  # inside the step, during forward
            return original(engine, batch)

        self.task.loss = loss  # type: ignore[method-assign]
        try:
            return super().run_step()
        finally:
            del self.task.loss


def read_rates(model: nn.Module) -> dict[str, Any]:
    """Every rate a forward pass reads, by where it lives."""
    out: dict[str, Any] = {
        "dropout": sorted({round(m.p, 6) for m in model.modules() if isinstance(m, nn.Dropout)}),
        "attn_float": sorted(
            {
                round(m.attention_dropout, 6)
                for m in model.modules()
                if isinstance(m.__dict__.get("attention_dropout"), float)
            }
        ),
        "drop_path": [round(m.drop_prob, 6) for m in model.modules() if isinstance(m, DropPath)],
    }
    config = getattr(model, "config", None)
    if config is not None:
        out["config"] = round(config.attention_dropout, 6)
    return out


@pytest.mark.parametrize(("mode", "schedule"), list(EXPECTED))
def test_scheduled_rate_matches_the_paper(mode, schedule):
    cfg = DropoutConfig(**_cfg(mode, schedule))
    got = [scheduled_rate(cfg, R, k, STEPS) for k in range(STEPS)]
    assert got == pytest.approx(EXPECTED[(mode, schedule)])


def test_cutoff_fraction_is_of_schedule_steps():
    cfg = DropoutConfig(mode="early", rate=0.5, cutoff_fraction=0.25)
    assert cfg.resolved_cutoff(100) == 25
    assert scheduled_rate(cfg, 0.5, 24, 100) == 0.5 and scheduled_rate(cfg, 0.5, 25, 100) == 0.0


@pytest.mark.parametrize(("mode", "schedule"), list(EXPECTED))
def test_llama_attention_dropout_float_follows_schedule(mode, schedule, tmp_path, gloo_world):
    recipe = tiny_recipe(
        tmp_path,
        schedule={"steps": STEPS},
        checkpoint={"every": 0},
        techniques={"dropout": _cfg(mode, schedule)},
    )
    trainer = Recording(recipe, WorkerContext(run_dir=tmp_path / "run"))
    trainer.run()
    for step, rate in enumerate(EXPECTED[(mode, schedule)]):
        seen = trainer.seen[step]
        assert seen["attn_float"] == [pytest.approx(rate, abs=1e-5)], (step, seen)
        assert seen["config"] == pytest.approx(rate, abs=1e-5)
    assert trainer.seen[0]["dropout"] == []  # LLaMA has no nn.Dropout: the floats are the rates


def test_llama_attention_float_is_read_in_forward():
    import transformers

    config = transformers.LlamaConfig(**TINY_RECIPE["model"]["config"])
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).train()
    tech = DropoutSchedule(DropoutConfig(mode="standard", rate=0.5))
    tech.attach(model)
    ids = torch.randint(0, 256, (2, 16))
    tech.apply(0, 10)
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    tech.cfg = DropoutConfig(mode="early", rate=0.5, cutoff_steps=1)
    tech.apply(5, 10)  # after the cut-off: rate 0 -> deterministic again
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_gpt2_dropout_modules_and_config_are_set():
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    tech = DropoutSchedule(DropoutConfig(mode="early", schedule="linear", rate=R, cutoff_steps=4))
    sites = tech.attach(model)
    assert len(sites.modules) >= 7  # embd + per block attn/resid/mlp dropouts
    tech.apply(1, STEPS)
    rates = {round(m.p, 6) for m in model.modules() if isinstance(m, nn.Dropout)}
    assert rates == {0.2}
    assert model.config.attn_pdrop == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("mode", "schedule"), [("standard", "constant"), ("early", "linear"), ("late", "constant")]
)
def test_vit_dropout_and_drop_path_follow_schedule(mode, schedule, tmp_path, gloo_world):
    recipe = _vit_recipe(
        tmp_path,
        schedule={"steps": STEPS},
        checkpoint={"every": 0},
        techniques={"dropout": _cfg(mode, schedule, target="both", drop_path_rate=0.2)},
    )
    trainer = Recording(recipe, WorkerContext(run_dir=tmp_path / "run"))
    trainer.run()
    for step, rate in enumerate(EXPECTED[(mode, schedule)]):
        seen = trainer.seen[step]
        assert seen["dropout"] == [pytest.approx(rate, abs=1e-5)], (step, seen)
        path = rate / R * 0.2  # the drop-path rate follows the same shape
        # three blocks, two DropPaths each, linear in depth: 0, r/2, r
        want = [0.0, 0.0, path / 2, path / 2, path, path]
        assert seen["drop_path"] == pytest.approx(want, abs=1e-5), (step, seen)


def test_rates_after_resume_equal_the_uninterrupted_run(tmp_path, gloo_world):
    recipe = _vit_recipe(
        tmp_path,
        schedule={"steps": STEPS},
        checkpoint={"every": 3},
        techniques={"dropout": _cfg("early", "linear", target="both", cutoff_steps=6)},
    )
    straight = Recording(recipe, WorkerContext(run_dir=tmp_path / "straight"))
    straight.run()
    Recording(recipe, WorkerContext(run_dir=tmp_path / "split", stop_after_steps=3)).run()
    resumed = Recording(recipe, WorkerContext(run_dir=tmp_path / "split"))
    resumed.run()
    assert resumed.events[0]["kind"] == "resume" and resumed.events[0]["from_step"] == 3
    assert sorted(resumed.seen) == list(range(3, STEPS))
    for step in range(3, STEPS):
        assert resumed.seen[step] == straight.seen[step], step
    assert straight.seen[3]["dropout"] != straight.seen[2]["dropout"]  # the rate really moves
    a = straight.built.engine.module.state_dict()
    b = resumed.built.engine.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # dropout masks replayed bit-for-bit


class TimmLikeBlock(nn.Module):
    """timm's pattern: DropPath only when the rate is > 0, else nn.Identity."""

    def __init__(self, drop_path: float):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()


def _setup(model: nn.Module) -> Setup:
    return Setup(recipe=None, model=model, param_groups=[], ds_config={}, rank=0, world_size=1)  # type: ignore[arg-type]


def test_model_built_with_rate_zero_is_a_clear_error():
    tech = DropoutSchedule(DropoutConfig(mode="early", cutoff_steps=2, target="drop_path"))
    with pytest.raises(UsageError, match="maximum rate") as info:
        tech.configure(_setup(nn.Sequential(TimmLikeBlock(0.0), TimmLikeBlock(0.0))))
    assert "nn.Identity" in str(info.value) and "0.drop_path" in str(info.value)
    tech.configure(_setup(nn.Sequential(TimmLikeBlock(0.0), TimmLikeBlock(0.1))))  # some live: ok

    no_dropout = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    tech = DropoutSchedule(DropoutConfig(mode="early", cutoff_steps=2, target="dropout"))
    with pytest.raises(UsageError, match="no dropout"):
        tech.configure(_setup(no_dropout))


def test_builtin_models_built_at_rate_zero_keep_real_modules():
    vit = build_builtin("vit", {"dropout": 0.0, "drop_path": 0.0, "depth": 2, "dim": 16}, seed=0)
    tech = DropoutSchedule(DropoutConfig(mode="standard", rate=0.2, target="dropout"))
    tech.attach(vit)  # nn.Dropout(0.0) modules exist: a schedule can raise them
    tech.apply(0, 4)
    assert {m.p for m in vit.modules() if isinstance(m, nn.Dropout)} == {0.2}
    with pytest.raises(UsageError, match="maximum rate"):  # but no drop-path profile to scale
        DropoutSchedule(DropoutConfig(mode="standard", target="drop_path")).attach(vit)


def test_rate_zero_error_through_the_trainer(tmp_path, gloo_world):
    recipe = _vit_recipe(
        tmp_path,
        model={"config": {"drop_path": 0.0}},
        techniques={"dropout": {"mode": "early", "cutoff_steps": 2, "target": "both"}},
    )
    with pytest.raises(UsageError, match="drop_path"):
        Trainer(recipe, WorkerContext(run_dir=tmp_path / "run")).run()


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"mode": "early"}, "techniques.dropout"),
        ({"mode": "standard", "schedule": "linear"}, "techniques.dropout"),
        ({"mode": "late", "cutoff_steps": 2, "cutoff_fraction": 0.5}, "techniques.dropout"),
        ({"mode": "early", "cutoff_steps": 99}, "techniques.dropout.cutoff_steps"),
        ({"mode": "early", "cutoff_steps": 2, "rate": 1.0}, "techniques.dropout.rate"),
        ({"mode": "early", "cutoff_steps": 2, "target": "attn"}, "techniques.dropout.target"),
    ],
)
def test_bad_config_names_its_key(cfg, key, tmp_path):
    with pytest.raises(RecipeError) as info:
        tiny_recipe(tmp_path, techniques={"dropout": cfg})
    assert key in [p.key for p in info.value.problems], info.value


def test_plan_shows_rates_at_phase_boundaries(tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        schedule={"steps": 100},
        techniques={
            "dropout": {
                "mode": "early",
                "schedule": "linear",
                "rate": 0.1,
                "cutoff_fraction": 0.2,
                "target": "both",
                "drop_path_rate": 0.2,
            }
        },
    )
    info = plan_of(Variant(name="v", recipe=recipe, assignments={}))["techniques"]["dropout"]
    assert info["cutoff_step"] == 20
    assert info["rate_at_step"] == pytest.approx(
        {0: 0.1, 10: 0.1 * 9 / 19, 19: 0.0, 20: 0.0, 99: 0.0}
    )
    assert info["drop_path_rate_at_step"][0] == pytest.approx(0.2)


class StochasticDepth(nn.Module):
    """torchvision's name and attribute (``p``)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p


class HFLikeConfig:
    """An HF-style config: found through ``to_dict`` on the module that holds it."""

    def __init__(self, **fields: float):
        self.__dict__.update(fields)

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class EverySite(nn.Module):
    """One of each site kind: ``nn.Dropout``, an attention-dropout float, HF config fields,
    six DropPaths linear in depth (0.1 * i / 5: shares 0, 1/5, ..., 1), a StochasticDepth
    and a float ``drop_path`` attribute."""

    def __init__(self, rate: float = 0.1, depth: int = 6):
        super().__init__()
        self.config = HFLikeConfig(attention_dropout=rate, drop_path_rate=rate)
        self.attention_dropout = rate
        self.drop = nn.Dropout(rate)
        self.paths = nn.ModuleList(DropPath(rate * i / (depth - 1)) for i in range(depth))
        self.depth = StochasticDepth(rate / 2)
        self.drop_path = rate / 4

    def dropout_values(self) -> list[float]:
        return [self.drop.p, self.attention_dropout, self.config.attention_dropout]

    def path_values(self) -> list[float]:
        paths = [m.drop_prob for m in self.paths]
        return [*paths, self.depth.p, self.drop_path, self.config.drop_path_rate]


# every mode and schedule, plus an early ramp where re-deriving the shares from the current
# rates at a rebuild used to drift by an ulp (0.1, six sites, cut-off 6: at step 2)
REBUILD_CASES = [_cfg(m, s, target="both", drop_path_rate=0.1) for m, s in EXPECTED] + [
    {"mode": "early", "schedule": "linear", "rate": 0.1, "cutoff_steps": 6, "target": "both"}
]


@pytest.mark.parametrize("cfg", REBUILD_CASES, ids=lambda c: f"{c['mode']}-{c['schedule']}")
def test_rebuilds_keep_the_sites_and_drop_path_shares_of_the_first_build(cfg):
    """``configure`` before every step (an engine rebuild each time, as LISA's switches do)
    sets exactly the rates of a model configured once, on every site kind."""
    once, rebuilt = EverySite(), EverySite()
    built = once.path_values()
    shares = [b / max(built) for b in built]
    steady = DropoutSchedule(DropoutConfig(**cfg))
    steady.configure(_setup(once))
    tech = DropoutSchedule(DropoutConfig(**cfg))
    total = 12
    for step in range(total):
        tech.configure(_setup(rebuilt))  # after the previous step's rates, 0 included
        rate, path_rate = tech.apply(step, total)
        assert (rate, path_rate) == steady.apply(step, total)
        assert rebuilt.dropout_values() == once.dropout_values() == [rate] * 3, step
        assert rebuilt.path_values() == once.path_values(), (step, cfg)
        assert once.path_values() == [path_rate * s for s in shares], step
    if cfg["mode"] != "standard":  # a rebuild at rate 0 ran
        assert any(tech.rates(k, total)[1] == 0 for k in range(total))


def test_a_new_model_is_a_new_first_build():
    tech = DropoutSchedule(DropoutConfig(mode="standard", rate=0.2, target="both"))
    first, second = EverySite(), EverySite(rate=0.3)
    tech.configure(_setup(first))
    tech.configure(_setup(second))  # another model object: its own sites and shares
    tech.apply(0, 4)
    assert second.dropout_values() == [0.2] * 3 and second.drop_path == 0.2 * (0.3 / 4) / 0.3
    assert first.dropout_values() == [0.1] * 3  # the first model is no longer written


@pytest.mark.parametrize("mode", ["early", "late"])
def test_the_phase_boundary_is_a_regime_change_for_the_spike_guard(mode, tmp_path):
    """The cut-off step (and no other) restarts the spike guard's statistics."""
    from orchestrator.techniques.base import TrainState

    schedule = DropoutSchedule(DropoutConfig(mode=mode, rate=0.1, cutoff_steps=3))
    schedule.attach(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)))
    state = TrainState(tiny_recipe(tmp_path), total_steps=8)
    marked = []
    for step in range(8):
        state._begin_step()
        state._update(step=step)
        schedule.on_step_begin(state)
        if state.regime_change:
            marked.append(step)
    assert marked == [3]
