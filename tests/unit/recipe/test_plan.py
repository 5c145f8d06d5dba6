"""`regimen plan`: each variant's schedule without training."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.cli import main
from orchestrator.recipe.expand import Variant, expand
from orchestrator.recipe.loader import Problems, load_recipe, validate_data
from orchestrator.recipe.plan import checkpoint_steps, plan_of, render_plan

REPO = Path(__file__).resolve().parents[3]


def variant(**sections: object) -> Variant:
    data = {"name": "p", "schedule": {"steps": 100}, "resources": {"workers": 2}, **sections}
    problems = Problems("<test>")
    recipe = validate_data(data, problems)
    assert recipe is not None, problems.items
    return Variant(name=recipe.name, assignments={}, recipe=recipe)


def test_quickstart_plan() -> None:
    (v,) = expand(load_recipe(REPO / "recipes" / "quickstart.yaml"))
    plan = plan_of(v)
    assert plan["variant"] == "quickstart"
    assert plan["steps"] == 300
    assert plan["global_batch_size"] == 8 * 1 * 2
    assert plan["samples"] == 300 * 16
    assert plan["zero_stage"] == 1 and plan["precision"] == "fp32"
    assert plan["checkpoints"] == [100, 200, 300] and plan["checkpoint_count"] == 3
    warmup = plan["techniques"]["warmup"]
    assert warmup["warmup_steps"] == 30 and warmup["schedule"] == "cosine"
    assert plan["user_code"] == []
    json.dumps(plan)  # JSON-able


@pytest.mark.parametrize(
    ("steps", "every", "at_end", "listed", "count"),
    [
        (100, 25, True, [25, 50, 75, 100], 4),
        (100, 25, False, [25, 50, 75], 3),
        (10, 3, True, [3, 6, 9, 10], 4),
        (10, 0, True, [10], 1),
        (10, 0, False, [], 0),
        (5, 10, True, [5], 1),
        (1, 1, True, [1], 1),
    ],
)
def test_checkpoint_steps(
    steps: int, every: int, at_end: bool, listed: list[int], count: int
) -> None:
    assert checkpoint_steps(steps, every, at_end, limit=1000) == (listed, count)


def test_huge_runs_are_summarised_not_materialised() -> None:
    start = time.perf_counter()
    listed, count = checkpoint_steps(10**15, 1, True, limit=1000)
    assert time.perf_counter() - start < 0.5
    assert len(listed) == 1000 and count == 10**15
    v = variant(schedule={"steps": 10**12}, checkpoint={"every": 1})
    plan = plan_of(v)
    assert len(plan["checkpoints"]) == 1000 and plan["checkpoint_count"] == 10**12
    assert f"({10**12} in all)" in render_plan(plan)


def test_render_plan_escapes_user_text_and_lists_user_code() -> None:
    v = variant(
        model={"kind": "factory", "factory": "mypkg.models:build"},
        tracking={"run_name": "x"},
    )
    v = Variant(name="p-tag_[red]x", assignments={"tracking.run_name": "[bold]x"}, recipe=v.recipe)
    text = render_plan(plan_of(v))
    console = Console(file=io.StringIO(), highlight=False, soft_wrap=True, width=200)
    console.print(text)
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "p-tag_[red]x" in shown and "[bold]x" in shown
    assert "runs user code model.factory: mypkg.models:build" in shown
    assert "checkpoints at: 50, 100" in shown


def test_regimen_plan_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(REPO / "recipes" / "ci" / "tiny.yaml")
    with pytest.raises(SystemExit) as info:
        main(["plan", recipe])
    assert info.value.code == 0
    assert "20 steps x 8 samples (1 workers" in capsys.readouterr().out
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["plan", recipe, "--json"])
    plan = json.loads(out.getvalue())
    (only,) = plan["variants"]
    assert only["checkpoints"] == [10, 20] and only["steps"] == 20


def test_plan_of_a_sweep_shows_assignments(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        (REPO / "recipes" / "ci" / "tiny.yaml").read_text()
        + "sweep:\n  zip:\n    optimizer.lr: [1e-3, 2e-3]\n    schedule.steps: [10, 30]\n"
    )
    plans = [plan_of(v) for v in expand(load_recipe(path))]
    assert [p["variant"] for p in plans] == ["tiny-lr_0.001-steps_10", "tiny-lr_0.002-steps_30"]
    assert plans[1]["checkpoints"] == [10, 20, 30]
    assert "sweep: optimizer.lr=0.002, schedule.steps=30" in render_plan(plans[1])


def test_plan_shows_deepspeed_auto_resolved(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(REPO / "recipes" / "hf_style_zero2.yaml")
    with pytest.raises(SystemExit) as info:
        main(["plan", recipe])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert 'deepspeed "auto":' in text
    assert "train_micro_batch_size_per_gpu=4" in text and "gradient_clipping=0.5" in text
    assert "zero_optimization.reduce_bucket_size=500000000" in text
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["plan", recipe, "--json"])
    (only,) = json.loads(out.getvalue())["variants"]
    ds = only["deepspeed"]
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2
    assert "auto" not in json.dumps(ds)
    assert only["deepspeed_auto"]["optimizer.params.lr"] == 3e-3


def test_plan_shows_the_device_each_worker_will_choose() -> None:
    """The worker's rule (resources.device), not the planning machine's hardware."""
    cpu = plan_of(variant())
    assert cpu["device_per_worker"] == "cpu"
    assert "(2 workers, each on cpu, ZeRO-" in render_plan(cpu)
    gpu = plan_of(variant(resources={"workers": 4, "gpus_per_worker": 1}))
    assert gpu["device_per_worker"] == "cuda" and gpu["gpus_per_worker"] == 1
    assert "(4 workers, each on cuda with 1 GPU, ZeRO-" in render_plan(gpu)
