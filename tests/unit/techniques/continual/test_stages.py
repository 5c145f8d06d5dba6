"""The `continual:` section: validation, plan, exact replay mixing, and rollback of the buffer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_recipe
from orchestrator.engine.loop import Trainer, WorkerContext
from orchestrator.errors import RecipeError
from orchestrator.recipe import load_recipe
from orchestrator.recipe.expand import expand
from orchestrator.recipe.plan import plan_of, render_plan
from orchestrator.techniques.base import Context, TrainState
from orchestrator.techniques.continual.stages import build_stages
from orchestrator.techniques.continual.technique import Continual


def _digits(tmp_path: Path, **continual) -> dict:
    return {
        "name": "cl",
        "model": {"kind": "builtin", "architecture": "mlp", "config": {"dropout": 0.0}},
        "data": {"kind": "digits", "eval_fraction": 0.2},
        "schedule": {"steps": 20, "micro_batch_size": 10},
        "checkpoint": {"storage": str(tmp_path / "runs")},
        "resources": {"workers": 1},
        "continual": {
            "stages": [
                {"name": "a", "steps": 10, "classes": [0, 1]},
                {"name": "b", "steps": 10, "classes": [2, 3]},
            ],
            "replay": {"size": 40, "policy": "class_balanced", "ratio": 0.3},
            **continual,
        },
    }


def _load(tmp_path: Path, data: dict) -> object:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_recipe(path)


def _problems(tmp_path: Path, data: dict) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, data)
    return {p.key: p.message for p in info.value.problems}


def test_nonsense_is_rejected_with_key_and_fix(tmp_path):
    data = _digits(tmp_path)
    data["schedule"]["steps"] = 25
    assert "set schedule.steps: 20" in _problems(tmp_path, data)["continual.stages"]
    data = _digits(tmp_path, replay={"size": 10, "ratio": 1.0})
    assert "continual.replay.ratio" in _problems(tmp_path, data)
    data = _digits(tmp_path, replay={"size": 0, "ratio": 0.5})
    assert "set size > 0" in _problems(tmp_path, data)["continual.replay"]
    data = _digits(tmp_path)
    data["continual"]["stages"][1]["classes"] = [2, 2]
    assert "continual.stages.1.classes" in _problems(tmp_path, data)
    data["continual"]["stages"][1] = {"name": "a", "steps": 10}
    assert "unique" in _problems(tmp_path, data)["continual"]
    data = _digits(tmp_path)
    data["continual"]["stages"][0]["restart_schedule"] = True
    assert (
        "add techniques.warmup" in _problems(tmp_path, data)["continual.stages.0.restart_schedule"]
    )


def test_language_models_cannot_use_classes_or_class_balance(tmp_path):
    with pytest.raises(RecipeError) as info:
        tiny_recipe(
            tmp_path,
            schedule={"steps": 6},
            continual={
                "stages": [{"name": "a", "steps": 6, "classes": [1]}],
                "replay": {"size": 4, "policy": "class_balanced", "ratio": 0.5},
            },
        )
    keys = {p.key for p in info.value.problems}
    assert {"continual.stages.0.classes", "continual.replay.policy"} <= keys


def test_plan_shows_each_stage_with_its_step_range(tmp_path):
    loaded = _load(tmp_path, _digits(tmp_path))
    (variant,) = expand(loaded)
    plan = plan_of(variant)
    assert plan["techniques"]["continual"]["stages"] == [
        "a steps [0, 10) classes [0, 1]",
        "b steps [10, 20) classes [2, 3]",
    ]
    assert "b steps [10, 20) classes [2, 3]" in render_plan(plan)
    assert "class_balanced size 40, 3/10 per micro-batch" in render_plan(plan)


@pytest.mark.parametrize(("ratio", "k"), [(0.1, 1), (0.3, 3), (0.5, 5), (0.9, 9)])
def test_replay_ratio_is_exact_in_every_micro_batch(tmp_path, ratio, k):
    recipe = _load(tmp_path, _digits(tmp_path, replay={"size": 40, "ratio": ratio})).recipe
    technique = Continual(recipe.continual, recipe)
    state = TrainState(recipe=recipe, total_steps=20)  # what the stage stream reads: the step
    ctx = Context(recipe=recipe, state=state, model=torch.nn.Linear(1, 1), task=None, data=None)
    technique.bind(ctx)
    batches = technique.wrap_batches(None, ctx)  # type: ignore[arg-type]  (it supplies its own)
    first = batches.micro_batch_at(0, 0)["labels"]
    assert set(first.tolist()) <= {0, 1} and len(first) == 10  # empty buffer: all fresh
    for step in range(10):  # stage a fills the buffer from its fresh samples
        state._update(step=step)
        for task, index, label in batches.fresh_ids(step * 10, step):
            technique.buffer.add(task, index, label)
    for step in range(10, 20):  # stage b: exactly k samples of the old classes per batch
        state._update(step=step)
        labels = batches.micro_batch_at(step * 10, 0)["labels"]
        assert len(labels) == 10
        assert int((labels < 2).sum()) == k and int((labels >= 2).sum()) == 10 - k
    assert len(technique.buffer) == min(40, 10 + 9 * (10 - k))  # fresh samples only


def test_stage_data_is_a_class_subset_with_a_fixed_eval_subset(tmp_path):
    recipe = _load(tmp_path, _digits(tmp_path, eval={"subset_size": 7})).recipe
    a, b = build_stages(recipe.continual, recipe)
    assert set(a.labels.tolist()) == {0, 1} and set(b.labels.tolist()) == {2, 3}
    assert (a.start, a.end, b.start, b.end) == (0, 10, 10, 20)
    assert (
        len(a.eval_subset) == 7
        and a.eval_subset == build_stages(recipe.continual, recipe)[0].eval_subset
    )
    assert {int(b.eval[i]["labels"]) for i in b.eval_subset} <= {2, 3}


GUARD = {"window": 16, "min_history": 4, "patience": 1, "good_after": 1, "skip_batches": 2}
GUARD |= {"grad_norm_zscore": False}


def test_restart_schedule_restarts_warmup_at_the_stage(tmp_path):
    from orchestrator.techniques.registry import build_techniques

    data = _digits(tmp_path)
    data["techniques"] = {"warmup": {"warmup_steps": 4, "schedule": "linear"}}
    data["optimizer"] = {"lr": 0.01}
    data["continual"]["stages"][1]["restart_schedule"] = True
    recipe = _load(tmp_path, data).recipe
    techniques = build_techniques(recipe)
    cl = next(t for t in techniques if isinstance(t, Continual))
    cl.stages = build_stages(recipe.continual, recipe)
    events: list[str] = []

    def lr_at(step: int) -> float:
        state = TrainState(
            recipe=recipe, total_steps=20, rank=0, world_size=1, step=step,
            on_event=lambda kind, payload: events.append(f"{kind}:{payload['stage']}"),
        )  # fmt: skip
        for technique in techniques:
            technique.on_step_begin(state)
        return state.lr

    assert lr_at(0) == pytest.approx(0.0025) and lr_at(3) == pytest.approx(0.01)  # warmup
    assert lr_at(9) < 0.01  # global linear decay over 20 steps in stage a
    assert lr_at(10) == pytest.approx(0.0025)  # stage b: warmup again from its first step
    assert lr_at(13) == pytest.approx(0.01) and lr_at(19) < lr_at(14)
    assert events == ["stage:a", "stage:b"]  # the switch is an event


def test_a_stage_switch_is_not_taken_for_a_loss_spike(tmp_path, gloo_world):
    """New classes at a switch make the loss jump by design: the spike guard restarts its
    statistics there instead of skipping steps and rolling back."""
    data = _digits(tmp_path)
    data["schedule"] = {"steps": 40, "micro_batch_size": 10}
    data["continual"]["stages"] = [
        {"name": "a", "steps": 20, "classes": [0, 1]},
        {"name": "b", "steps": 20, "classes": [2, 3]},
    ]
    data["stability"] = {**GUARD, "min_history": 6}
    recipe = _load(tmp_path, data).recipe
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"))
    summary = trainer.run()
    kinds = [(e["kind"], e["step"]) for e in summary["events"]]
    assert ("detector_reset", 20) in kinds
    assert not [k for k in kinds if k[0] in ("spike", "rollback")], kinds
    assert summary["skipped_steps"] == 0 and summary["rollbacks"] == 0
