"""SGG: the documented formula on hand-made momenta, compact state, resume, ZeRO layers."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe
from orchestrator.errors import RecipeError
from orchestrator.techniques.sgg import SGGConfig, SGGOptimizer


def _lower_median(values: list[float]) -> float:
    s = sorted(values)
    return s[(len(s) - 1) // 2]


def _layer(magnitudes: list[tuple[float, int]], seed: int) -> torch.Tensor:
    """A momentum tensor holding ``n`` values of about ``±mag`` for each (mag, n), shuffled."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for mag, n in magnitudes:
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        parts.append(sign * mag * (1 + 0.05 * torch.rand(n, generator=gen)))
    flat = torch.cat(parts)
    return flat[torch.randperm(flat.numel(), generator=gen)].reshape(-1, 10)


def _wrapper(params: list[torch.Tensor], **cfg) -> SGGOptimizer:
    groups = [{"params": [p], "sgg": True} for p in params]
    return SGGOptimizer(torch.optim.AdamW(groups, lr=1e-2, foreach=False), SGGConfig(**cfg))


def _expected(m: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """Labels and per-cluster MDA by a direct (pure Python) reading of the documented formula."""
    x = [abs(v) for v in m.flatten().tolist()]
    n_sample = len(x)
    srt = sorted(x)
    cents = []
    for j in range(k):  # torch.quantile's linear interpolation at (j + 0.5) / K
        pos = (j + 0.5) / k * (n_sample - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n_sample - 1)
        cents.append(srt[lo] + (srt[hi] - srt[lo]) * (pos - lo))

    def assign(c: list[float]) -> list[int]:
        mids = [(c[i] + c[i + 1]) / 2 for i in range(k - 1)]
        return [sum(v > mid for mid in mids) for v in x]

    labels = assign(cents)
    for j in range(k):  # one mini-batch k-means pass from zero counts: centroid = cluster mean
        members = [v for v, lab in zip(x, labels, strict=False) if lab == j]
        if members:
            cents[j] = sum(members) / len(members)
    cents.sort()
    labels = assign(cents)
    flat = m.flatten().tolist()
    mean = sum(flat) / len(flat)
    mda = []
    for j in range(k):
        dev = [abs(v - mean) for v, lab in zip(flat, labels, strict=False) if lab == j]
        mda.append(_lower_median(dev) if dev else float("nan"))
    return labels, mda


def test_grouping_and_factors_match_the_formula():
    layers = [
        _layer([(0.01, 34), (1.0, 33), (10.0, 33)], seed=1),
        _layer([(0.001, 40), (0.1, 30), (3.0, 30)], seed=2),
    ]
    params = [torch.zeros_like(m) for m in layers]
    opt = _wrapper(params, clusters=3, scale_decay=0.9)
    for p, m in zip(params, layers, strict=False):
        opt.recluster(p, m)
        assert opt.state[p]["sgg_labels"].dtype == torch.uint8
    for g in opt.param_groups:
        g["sgg_pending"] = True
    stats = opt.finalize()

    all_mda = []
    for p, m in zip(params, layers, strict=False):
        labels, mda = _expected(m, 3)
        assert opt.state[p]["sgg_labels"].tolist() == labels
        assert torch.allclose(opt.state[p]["sgg_mda"], torch.tensor(mda), rtol=1e-6)
        all_mda += mda
    d_star = _lower_median(all_mda)
    all_scales = []
    for p, m in zip(params, layers, strict=False):
        _, mda = _expected(m, 3)
        want = [0.9 * 1.0 + 0.1 * min(10.0, max(0.1, d_star / (d + 1e-8))) for d in mda]
        assert torch.allclose(opt.state[p]["sgg_scale"], torch.tensor(want), rtol=1e-6)
        all_scales += want
    assert stats is not None
    assert stats["sgg/scale_min"] == pytest.approx(min(all_scales), rel=1e-6)
    assert stats["sgg/scale_max"] == pytest.approx(max(all_scales), rel=1e-6)
    assert stats["sgg/scale_median"] == pytest.approx(_lower_median(all_scales), rel=1e-6)
    # the three magnitude classes of layer 0 land in three different clusters
    labels0 = opt.state[params[0]]["sgg_labels"].long()
    mags0 = layers[0].abs().flatten()
    for lo, hi in ((0, 0.02), (0.9, 1.2), (9, 11)):
        assert len(set(labels0[(mags0 > lo) & (mags0 < hi)].tolist())) == 1


def test_scaled_adamw_step_matches_the_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20, 10))
    opt = _wrapper(
        [w], clusters=3, recluster_interval=2, scale_decay=0.0, scale_min=0.5, scale_max=2.0
    )
    for _ in range(3):  # recluster after step 2, finalized at the start of step 3
        w.grad = torch.randn_like(w)
        before = w.detach().clone()
        st = opt.state[w]
        m_prev = st["exp_avg"].clone() if "exp_avg" in st else torch.zeros_like(w)
        v_prev = st["exp_avg_sq"].clone() if "exp_avg_sq" in st else torch.zeros_like(w)
        opt.step()
    t = 3
    m = 0.9 * m_prev + 0.1 * w.grad
    v = 0.999 * v_prev + 0.001 * w.grad**2
    s = st["sgg_scale"][st["sgg_labels"].long()].view_as(w)
    assert not torch.allclose(s, torch.ones_like(s))
    lr = 1e-2
    want = before * (1 - lr * 0.01) - lr * s / (1 - 0.9**t) * m / (
        (v / (1 - 0.999**t)).sqrt() + 1e-8
    )
    assert torch.allclose(w.detach(), want, rtol=1e-5, atol=1e-7)


def test_no_scaling_before_first_recluster_is_plain_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(16, 8))
    b = torch.nn.Parameter(a.detach().clone())
    plain = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1, foreach=False)
    wrapped = SGGOptimizer(
        torch.optim.AdamW([{"params": [b], "sgg": True}], lr=1e-2, weight_decay=0.1, foreach=False),
        SGGConfig(recluster_interval=100),
    )
    for _ in range(5):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), g.clone()
        plain.step()
        wrapped.step()
    assert torch.equal(a, b)


def test_labels_are_uint8_up_to_256_clusters():
    assert SGGConfig(clusters=256).clusters == 256
    with pytest.raises(ValueError):
        SGGConfig(clusters=257)
    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = _wrapper([w], clusters=256)
    opt.recluster(w, torch.randn(64, 64))
    labels = opt.state[w]["sgg_labels"]
    assert labels.dtype == torch.uint8 and labels.numel() == w.numel() and int(labels.max()) <= 255


def test_bad_clamp_is_rejected(tmp_path: Path):
    with pytest.raises(RecipeError) as info:
        tiny_recipe(tmp_path, techniques={"sgg": {"scale_min": 2.0, "scale_max": 1.0}})
    assert any(p.key.startswith("techniques.sgg") for p in info.value.problems)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(12, 6))
    w2 = torch.nn.Parameter(w1.detach().clone())
    grads = [torch.randn(12, 6) for _ in range(9)]
    o1 = _wrapper([w1], recluster_interval=2, scale_decay=0.5)
    for g in grads[:5]:
        w1.grad = g.clone()
        o1.step()
    sd = o1.state_dict()
    assert sd["state"][0]["sgg_labels"].dtype == torch.uint8
    assert sd["param_groups"][0]["sgg_reclusters"] >= 1
    o2 = _wrapper([w2], recluster_interval=2, scale_decay=0.5)
    with torch.no_grad():
        w2.copy_(w1)
    o2.load_state_dict(copy.deepcopy(sd))  # as a checkpoint would: no shared tensors
    assert o2.state[w2]["sgg_labels"].dtype == torch.uint8
    assert o2.state_dict()["param_groups"] == sd["param_groups"]
    for g in grads[5:]:
        w1.grad, w2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert torch.equal(w1, w2)
