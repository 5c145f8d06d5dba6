"""Update clipping by effect, on a torch AdamW (no DeepSpeed): a tensor whose gradient dwarfs
its second moment takes AdamW's step with its LR divided by RMS(g^2 / v_hat); the others'
steps are unchanged; it holds per param group. ZeRO-0 vs ZeRO-2 and the recipe checks are
in tests/integration/techniques/test_update_clipping_engine.py and below."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_recipe
from orchestrator.errors import RecipeError
from orchestrator.techniques.update_clipping import UpdateClipper

BETAS = (0.9, 0.95)
LR, WD = 1e-2, 0.1


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 4), (16,), (4, 4)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in _params()]


def _step(opt: torch.optim.Optimizer, params, grads) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()


def _expected_rms(opt: torch.optim.Optimizer, p: torch.Tensor, g: torch.Tensor) -> float:
    """RMS(g^2 / v_hat) of the coming step, written out from the paper's formula."""
    st = opt.state[p]
    t = int(st["step"]) + 1
    v_hat = (BETAS[1] * st["exp_avg_sq"] + (1 - BETAS[1]) * g * g) / (1 - BETAS[1] ** t)
    return math.sqrt(float((g * g / v_hat.clamp(min=1e-16)).mean()))


def _adamw(groups) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, weight_decay=WD, foreach=False)


@pytest.mark.parametrize("split", [1, 3], ids=["one_group", "three_groups"])
def test_a_gradient_far_above_v_is_clipped_by_its_rms_and_nothing_else_changes(split):
    """20 steps of the same gradients build v; then tensor 0's gradient is multiplied by 50
    and the others' halved. Reference: plain AdamW whose group for tensor 0 has lr / RMS
    (StableAdamW's definition)."""
    mults = [1.0, 0.5, 2.0]  # per-group LRs, as lr_multiplier or SGG make them

    def groups(params, lr0: float = LR):
        if split == 1:
            return [{"params": [params[0]], "lr": lr0}, {"params": params[1:], "lr": LR}]
        return [
            {"params": [p], "lr": (lr0 if i == 0 else LR) * mults[i]} for i, p in enumerate(params)
        ]

    g1 = _grads()
    g2 = [g1[0] * 50.0, g1[1] * 0.5, g1[2] * 0.5]
    clipped_params, ref_params = _params(), _params()
    clipper = UpdateClipper(max_rms=1.0)
    if split == 1:  # the clipper's optimizer: one group, as Regimen builds it
        opt = clipper.wrap(_adamw([{"params": clipped_params}]))
    else:
        opt = clipper.wrap(_adamw(groups(clipped_params)))
    ref = _adamw(groups(ref_params))
    for _ in range(20):
        _step(opt, clipped_params, g1)
        _step(ref, ref_params, g1)
        assert clipper.take_metrics()["update_clipping/clipped_fraction"] == 0.0  # v_hat = g^2
    for a, b in zip(clipped_params, ref_params, strict=True):
        assert torch.equal(a, b)

    rms = _expected_rms(ref, ref_params[0], g2[0])
    assert rms > 3.0  # the crafted case: g^2 >> v
    ref.param_groups[0]["lr"] = (LR * (mults[0] if split == 3 else 1.0)) / rms
    before = [p.detach().clone() for p in clipped_params]
    _step(opt, clipped_params, g2)
    _step(ref, ref_params, g2)

    assert clipper.last_factors.keys() == {0}
    assert clipper.last_factors[0] == pytest.approx(rms, rel=1e-6)
    torch.testing.assert_close(clipped_params[0], ref_params[0], rtol=1e-6, atol=1e-7)
    for i in (1, 2):  # the other tensors' updates are exactly AdamW's
        assert torch.equal(clipped_params[i], ref_params[i])
        assert not torch.equal(clipped_params[i], before[i])
    metrics = clipper.take_metrics()
    assert metrics["update_clipping/clipped_fraction"] == pytest.approx(1 / 3)
    assert metrics["update_clipping/rms_max"] == pytest.approx(rms, rel=1e-6)


def test_moments_are_adamws_own():
    """Clipping changes the step size only: exp_avg and exp_avg_sq equal plain AdamW's."""
    g1 = _grads()
    a, b = _params(), _params()
    opt = UpdateClipper().wrap(_adamw(a))
    ref = _adamw(b)
    for grads in [g1] * 10 + [[g * 30.0 for g in g1]]:
        _step(opt, a, grads)
        _step(ref, b, grads)
    for pa, pb in zip(a, b, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[pa][key], ref.state[pb][key])
        assert not torch.equal(pa, pb)  # every tensor was clipped at step 2


def test_a_skipped_step_records_nothing():
    clipper = UpdateClipper()
    clipper.wrap(_adamw(_params()))
    assert clipper.take_metrics() == {}


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"optimizer": {"name": "sgd"}}, "second moment"),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "ZeRO-3"),
    ],
)
def test_recipe_refuses_what_it_cannot_clip(sections, needle, tmp_path):
    with pytest.raises(RecipeError) as info:
        tiny_recipe(tmp_path, techniques={"update_clipping": {}}, **sections)
    problems = [p for p in info.value.problems if p.key == "techniques.update_clipping"]
    assert problems and needle in problems[0].message


def test_recipe_accepts_zero_2(tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        techniques={"update_clipping": {"max_rms": 2.0}},
        deepspeed={"zero_optimization": {"stage": 2}},
    )
    assert recipe.techniques.update_clipping.max_rms == 2.0
