"""One engine step at every ZeRO stage and group count: a skipped step changes nothing (no
parameter, no ZeRO master partition, no moment) and the next step is a normal one; SGG
finalizes once per step with one global D*, the same at ZeRO-0, ZeRO-2 and on two ranks.

Real DeepSpeed CPU engines on gloo: world 1 in process, and one two-rank case (ZeRO-2, LISA
and SGG on) in processes of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from two_ranks import run_two_ranks

from conftest import tiny_recipe
from orchestrator.data import BatchSource
from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
from orchestrator.recipe.techniques.warmup import scheduled_lr
from orchestrator.techniques.base import Capability, Decision, Setup, Technique, TrainState
from orchestrator.techniques.registry import build_techniques

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
STEPS = 5
SKIP_AT = 2  # the third optimizer step (state.step == 2 when it is decided) is skipped


class SkipAt(Technique):
    """Asks to skip the optimizer step decided at ``state.step == at``."""

    name = "skip_at"
    capabilities = frozenset({Capability.DECIDES_BEFORE_STEP})

    def __init__(self, at: int) -> None:
        self.at = at

    def on_before_optimizer_step(self, state: TrainState) -> Decision:
        return Decision.skip_step({"why": "test"}) if state.step == self.at else Decision()


class SplitInto(Technique):
    """Deals the trainable params into ``n`` param groups."""

    name = "split_into"
    capabilities = frozenset({Capability.CONFIGURES})

    def __init__(self, n: int) -> None:
        self.n = n

    def configure(self, setup: Setup) -> None:
        params = [p for g in setup.param_groups for p in g["params"]]
        setup.param_groups = [
            {"params": params[i :: self.n], "name": f"part{i}"} for i in range(self.n)
        ]


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter, ZeRO-1/2 fp32 master partition and client optimizer state tensor."""
    engine, opt = trainer.built.engine, trainer.built.optimizer
    out = {  # under ZeRO-3 a module parameter is a placeholder: its partition holds the values
        f"param/{n}": getattr(p, "ds_tensor", p).detach().clone()
        for n, p in engine.module.named_parameters()
    }
    zero = engine.optimizer
    flats = getattr(zero, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    flats = flats or getattr(zero, "fp32_partitioned_groups_flat", [])  # ZeRO-3
    names = {id(flat): f"fp32/{i}" for i, flat in enumerate(flats)}
    for i, flat in enumerate(flats):
        out[f"fp32/{i}"] = flat.detach().clone()
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            names.setdefault(id(p), f"{gi}/{pi}")
    for p, st in opt.state.items():  # ZeRO-3 empties the groups' params between steps
        for key, value in st.items():
            if torch.is_tensor(value):
                out[f"state/{names[id(p)]}/{key}"] = value.detach().clone()
    return out


class Watch(StepHook):
    """Snapshots around the skipped step and the one after; LR and counters of every step."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.snaps: dict[str, dict[str, torch.Tensor]] = {}
        self.lrs: dict[int, list[float]] = {}
        self.counters: list[tuple[int, int]] = []
        self.skipped: list[float] = []

    def before_optimizer_step(self, trainer: Trainer) -> None:
        if trainer.state.step == self.at:
            self.snaps["before"] = snapshot(trainer)

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = trainer.state.step  # steps done, this one included
        groups = trainer.built.optimizer.param_groups
        self.lrs[step - 1] = [g["lr"] / g.get("lr_multiplier", 1.0) for g in groups]
        self.counters.append((step, trainer.built.engine.global_steps))
        self.skipped.append(metrics["skipped"])
        if step == self.at + 1:
            self.snaps["skipped"] = snapshot(trainer)
        if step == self.at + 2:
            self.snaps["next"] = snapshot(trainer)


class SameData(BatchSource):
    """Every rank reads the micro-batches one rank would read at the same step, so two
    ranks average exactly the one-rank gradients."""

    def __init__(self, dataset: Any, seed: int, micro_batch: int, global_batch: int) -> None:
        super().__init__(dataset, seed, micro_batch, 0, 1)
        self.global_batch = global_batch

    def micro_batch_at(self, cursor: int, micro: int) -> dict[str, torch.Tensor]:
        return super().micro_batch_at(cursor // self.global_batch * self.micro_batch, micro)


class UseSameData(StepHook):
    """Installs :class:`SameData` before the first step."""

    def before_step(self, trainer: Trainer) -> None:
        if not isinstance(trainer.batches, SameData):
            r = trainer.recipe
            trainer.batches = SameData(
                trainer.data.train, r.seed, r.schedule.micro_batch_size, r.global_batch_size
            )


def recipe_for(
    tmp_path: Path, stage: int, groups: str, workers: int = 1, lisa: bool | None = None
) -> Any:
    """Tiny llama (4 layers); ``per_layer``: SGG on (reclustering every step), and LISA
    below ZeRO-3 (which refuses it)."""
    techniques: dict[str, Any] = {"warmup": {"warmup_steps": 4}}
    if groups == "per_layer":
        if stage < 3 if lisa is None else lisa:
            techniques["lisa"] = {"gamma": 2, "interval": 50}
        techniques["sgg"] = {"recluster_interval": 1, "scale_decay": 0.5}
    return tiny_recipe(
        tmp_path,
        model={"config": {"num_hidden_layers": 4}},
        schedule={"steps": STEPS},
        checkpoint={"every": 0, "at_end": False},
        techniques=techniques,
        resources={"workers": workers},
        deepspeed={"zero_optimization": {"stage": stage}},
    )


def techniques_for(recipe: Any, groups: str) -> list[Technique]:
    """The recipe's techniques, the skip, and for ``three`` the three-way split."""
    extra: list[Technique] = [SplitInto(3)] if groups == "three" else []
    return [*build_techniques(recipe), *extra, SkipAt(SKIP_AT)]


def check_skip(trainer: Trainer, watch: Watch, n_groups: int | None) -> None:
    """The skipped step changed nothing; the next one is a normal step."""
    before, skipped, after = watch.snaps["before"], watch.snaps["skipped"], watch.snaps["next"]
    assert watch.skipped == [float(s == SKIP_AT) for s in range(STEPS)]
    assert trainer.loop.skipped_steps == 1 and trainer.built.gate.skipped == 1
    if n_groups is not None:
        assert len(trainer.built.optimizer.param_groups) == n_groups
    assert before.keys() == skipped.keys() == after.keys()
    assert any(k.endswith("/exp_avg_sq") for k in before), sorted(before)
    if trainer.recipe.zero_stage >= 1:
        assert any(k.startswith("fp32/") for k in before)
    changed = [k for k in before if not torch.equal(before[k], skipped[k])]
    assert not changed, f"the skipped step changed {len(changed)} of {len(before)}: {changed}"
    # the next step updates: trained params move, and each moment's step counts only the
    # two updates before the skip and this one
    moved = [k for k in before if k.startswith("param/") and not torch.equal(skipped[k], after[k])]
    assert moved
    steps = {k: float(v) for k, v in after.items() if k.endswith("/step")}
    assert steps and set(steps.values()) == {float(SKIP_AT + 1)}, steps
    # DeepSpeed's counter follows Regimen's; the LR of every step is the schedule's
    assert watch.counters == [(s, s) for s in range(1, STEPS + 1)]
    cfg = trainer.recipe.techniques.warmup
    for step, lrs in watch.lrs.items():
        want = scheduled_lr(cfg, trainer.recipe.optimizer.lr, step, STEPS)
        assert lrs == pytest.approx([want] * len(lrs), rel=1e-12), step


def sgg_scales(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every SGG layer's K factors, by param group name."""
    (sgg,) = [t for t in trainer.techniques if t.name == "sgg"]
    opt, zero = sgg.wrapper, trainer.built.engine.optimizer
    pairs = [(g, p) for g in opt.param_groups for p in g["params"]]
    if hasattr(zero, "sub_group_to_group_id"):  # ZeRO-3: the flat of each sub-group
        groups = opt.param_groups
        pairs = [
            (groups[zero.sub_group_to_group_id[i]], flat)
            for i, flat in enumerate(zero.fp32_partitioned_groups_flat)
        ]
    return {g["name"]: opt.state[p]["sgg_scale"].clone() for g, p in pairs if g["sgg"]}


@pytest.mark.parametrize("groups", ["one", "three", "per_layer"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_skipped_step_changes_nothing(stage, groups, tmp_path, gloo_world):
    recipe = recipe_for(tmp_path, stage, groups)
    watch = Watch(SKIP_AT)
    trainer = Trainer(
        recipe,
        WorkerContext(run_dir=tmp_path / "run"),
        step_hooks=[watch],
        techniques=techniques_for(recipe, groups),
    )
    trainer.run()
    check_skip(trainer, watch, {"one": 1, "three": 3}.get(groups))


def _sgg_run(tmp_path: Path, stage: int, lisa: bool = True) -> Trainer:
    recipe = recipe_for(tmp_path, stage, "per_layer", lisa=lisa)
    trainer = Trainer(
        recipe,
        WorkerContext(run_dir=tmp_path / f"run{stage}{lisa}"),
        techniques=techniques_for(recipe, "per_layer"),
    )
    trainer.run()
    return trainer


@pytest.mark.parametrize("stage", [2, 3])
def test_sgg_scales_are_the_same_at_zero_0_and_zero_2_3(stage, tmp_path, gloo_world):
    """Same gradients: one global D* per step, whatever the stage steps group by group
    (LISA on with ZeRO-2; ZeRO-3 refuses LISA, so both runs go without it there)."""
    lisa = stage < 3
    zero0, zero2 = _sgg_run(tmp_path, 0, lisa), _sgg_run(tmp_path, stage, lisa)
    a, b = sgg_scales(zero0), sgg_scales(zero2)
    assert a.keys() == b.keys() and len(a) >= 4
    assert not torch.allclose(torch.cat(list(a.values())), torch.ones(3 * len(a)))
    # ZeRO-3 reduce-scatters the gradients in another order: equal up to the last bits,
    # which the clustering and the EMA carry into the factors' fourth digit
    rtol = 1e-5 if stage < 3 else 5e-3
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=rtol, atol=1e-6), (name, a[name], b[name])


_TWO_RANKS = """
import torch
from pathlib import Path
from test_zero_steps import (Watch, UseSameData, SKIP_AT, check_skip, recipe_for,
                             techniques_for, sgg_scales, snapshot)
from orchestrator.engine.loop import Trainer, WorkerContext

def worker(r, root):
    root = Path(root)
    recipe = recipe_for(root, 2, "per_layer", workers=2)
    watch = Watch(SKIP_AT)
    trainer = Trainer(recipe, WorkerContext(run_dir=root / "run", rank=r, world_size=2),
                      step_hooks=[UseSameData(), watch],
                      techniques=techniques_for(recipe, "per_layer"))
    trainer.run()
    check_skip(trainer, watch, None)
    if r == 0:
        params = {k: v for k, v in snapshot(trainer).items() if k.startswith("param/")}
        torch.save({"scales": sgg_scales(trainer), "params": params}, root / "rank0.pt")
    print(f"rank{r} skip ok", flush=True)
"""


def test_two_ranks_zero_2_skip_and_sgg_agree_with_one_rank(tmp_path, gloo_world):
    """ZeRO-2 over two gloo ranks with LISA and SGG: the skip holds on each rank, and with
    the same gradients the SGG factors (clustered on whole layers) and the weights are the
    one-rank run's."""
    here, tests = Path(__file__).parent, REPO / "tests"
    out = run_two_ranks(
        tmp_path / "two_ranks.py", _TWO_RANKS, tmp_path / "two", paths=(tests, here)
    )
    assert "rank0 skip ok" in out and "rank1 skip ok" in out
    two = torch.load(tmp_path / "two" / "rank0.pt", weights_only=True)
    recipe = recipe_for(tmp_path, 2, "per_layer")
    watch = Watch(SKIP_AT)
    one = Trainer(
        recipe,
        WorkerContext(run_dir=tmp_path / "one"),
        step_hooks=[watch],
        techniques=techniques_for(recipe, "per_layer"),
    )
    one.run()
    scales = sgg_scales(one)
    assert scales.keys() == two["scales"].keys()
    for name, s in scales.items():
        assert torch.allclose(s, two["scales"][name], rtol=1e-5, atol=1e-6), name
    params = {k: v for k, v in snapshot(one).items() if k.startswith("param/")}
    for name, p in params.items():
        assert torch.allclose(p, two["params"][name], rtol=1e-5, atol=1e-6), name


def test_a_skipped_first_step_leaves_zero_state_reachable(tmp_path, gloo_world):
    """ZeRO-2 links each param's view of the moments after the first optimizer call; when
    that call was skipped, the link is made again at the first real update."""
    from deepspeed.utils import safe_get_full_optimizer_state

    recipe = recipe_for(tmp_path, 2, "one")
    trainer = Trainer(
        recipe,
        WorkerContext(run_dir=tmp_path / "run"),
        techniques=[*build_techniques(recipe), SkipAt(0)],
    )
    trainer.run()
    assert trainer.loop.skipped_steps == 1
    weight = next(p for p in trainer.built.engine.module.parameters() if p.dim() == 2)
    exp_avg = safe_get_full_optimizer_state(weight, "exp_avg")
    assert exp_avg is not None and exp_avg.shape == weight.shape and exp_avg.abs().sum() > 0
