"""Sweeps: grid x zip counts, stable readable names, per-variant problems, speed."""

from __future__ import annotations

import contextlib
import io
import json
import re
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.errors import RecipeError
from orchestrator.recipe.expand import assignments_of, expand, variant_name
from orchestrator.recipe.loader import load_recipe

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
BASE = """\
name: sw
schedule:
  steps: 100
optimizer:
  lr: 1.0e-3
techniques:
  warmup:
    warmup_steps: 10
resources:
  workers: 1
"""


def recipe(tmp_path: Path, sweep: str, base: str = BASE) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(base + textwrap.dedent(sweep))
    return path


def test_no_sweep_is_one_variant_named_after_the_recipe(tmp_path: Path) -> None:
    loaded = load_recipe(recipe(tmp_path, ""))
    (variant,) = expand(loaded)
    assert variant.name == "sw" and variant.assignments == {}
    assert variant.recipe is loaded.recipe


def test_grid_is_the_cross_product_in_written_order(tmp_path: Path) -> None:
    path = recipe(
        tmp_path,
        """\
        sweep:
          grid:
            optimizer.lr: [1e-3, 3e-3]
            seed: [1, 2, 3]
        """,
    )
    variants = expand(load_recipe(path))
    assert [v.name for v in variants] == [
        "sw-lr_0.001-seed_1",
        "sw-lr_0.001-seed_2",
        "sw-lr_0.001-seed_3",
        "sw-lr_0.003-seed_1",
        "sw-lr_0.003-seed_2",
        "sw-lr_0.003-seed_3",
    ]
    v = variants[4]
    assert v.assignments == {"optimizer.lr": 0.003, "seed": 2}
    assert (v.recipe.optimizer.lr, v.recipe.seed, v.recipe.name) == (0.003, 2, v.name)
    assert v.recipe.sweep is None
    assert [v.assignments for v in variants] == assignments_of(load_recipe(path))


def test_zip_and_grid_times_zip(tmp_path: Path) -> None:
    zipped = recipe(
        tmp_path,
        """\
        sweep:
          zip:
            optimizer.lr: [1e-3, 2e-3, 3e-3]
            techniques.warmup.warmup_steps: [5, 10, 20]
        """,
    )
    variants = expand(load_recipe(zipped))
    assert [v.name for v in variants] == [
        "sw-lr_0.001-warmup_steps_5",
        "sw-lr_0.002-warmup_steps_10",
        "sw-lr_0.003-warmup_steps_20",
    ]
    both = recipe(
        tmp_path,
        """\
        sweep:
          grid:
            seed: [0, 1]
          zip:
            optimizer.lr: [1e-3, 2e-3, 3e-3]
            optimizer.weight_decay: [0.0, 0.1, 0.2]
        """,
    )
    variants = expand(load_recipe(both))
    assert len(variants) == 2 * 3
    assert variants[0].name == "sw-seed_0-lr_0.001-weight_decay_0.0"
    assert variants[-1].name == "sw-seed_1-lr_0.003-weight_decay_0.2"


def test_names_are_stable_readable_and_valid(tmp_path: Path) -> None:
    path = recipe(
        tmp_path,
        """\
        sweep:
          grid:
            optimizer.betas: [[0.9, 0.95], [0.8, 0.99]]
            checkpoint.at_end: [true, false]
            tracking.run_name: [null, "a b/c", "plain"]
            data.factory_args.seed: [1]
            seed: [2]
        """,
    )
    first = [v.name for v in expand(load_recipe(path))]
    again = [v.name for v in expand(load_recipe(path))]
    assert first == again and len(set(first)) == len(first) == 12
    for name in first:
        assert NAME.match(name) and len(name) <= 100
    assert first[0] == "sw-betas_0.9_0.95-at_end_true-run_name_null-factory_args.seed_1-seed_2"
    assert re.match(r"sw-betas_0.9_0.95-at_end_true-run_name_a_b_c\.[0-9a-f]{6}-", first[1])


def test_long_names_end_in_a_hash() -> None:
    long_base = "x" * 90
    a = variant_name(long_base, {"optimizer.lr": 0.001, "seed": 1})
    b = variant_name(long_base, {"optimizer.lr": 0.001, "seed": 2})
    assert len(a) == len(b) == 100 and a != b and NAME.match(a)
    assert variant_name("r", {"optimizer.lr": 1e-05}) == "r-lr_1e-05"


def test_a_bad_value_is_reported_with_its_variant_and_line(tmp_path: Path) -> None:
    path = recipe(
        tmp_path,
        """\
        sweep:
          grid:
            seed: [1, 2]
            optimizer.lr:
              - 1e-3
              - -2e-3
        """,
    )
    with pytest.raises(RecipeError) as info:
        expand(load_recipe(path))
    (problem,) = info.value.problems
    assert problem.key == "optimizer.lr"
    assert problem.line == BASE.count("\n") + 6  # the '- -2e-3' item
    assert "in variants sw-seed_1-lr_-0.002, sw-seed_2-lr_-0.002:" in problem.message
    assert "greater than 0" in problem.message


def test_a_value_that_breaks_every_variant_is_said_once(tmp_path: Path) -> None:
    path = recipe(
        tmp_path,
        # (a DeepSpeed scheduler block: an agreeing optimizer block is accepted now)
        "sweep:\n  grid:\n    deepspeed.scheduler: [{type: WarmupLR}]\n    seed: [1, 2, 3]\n",
    )
    with pytest.raises(RecipeError) as info:
        expand(load_recipe(path))
    (problem,) = info.value.problems
    assert (problem.key, problem.line) == ("deepspeed.scheduler", BASE.count("\n") + 3)
    assert problem.message.startswith("in every variant (3): Regimen owns this block")


def test_variant_that_breaks_a_cross_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = recipe(tmp_path, "sweep:\n  grid:\n    schedule.steps: [5, 100, 200]\n")
    with pytest.raises(SystemExit) as info:
        main(["validate", str(path)])
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{path}:8: techniques.warmup.warmup_steps: in variant sw-steps_5: ")


def test_same_looking_values_collide_with_a_clear_message(tmp_path: Path) -> None:
    path = recipe(tmp_path, "sweep:\n  grid:\n    tracking.run_name: ['1', '01']\n    seed: [1]\n")
    assert len(expand(load_recipe(path))) == 2
    clash = recipe(tmp_path, "sweep:\n  grid:\n    model.factory_args.x: [1, '1']\n")
    with pytest.raises(RecipeError, match="all named sw-x_1"):
        expand(load_recipe(clash))


def write_1000(tmp_path: Path) -> Path:
    values = ", ".join(f"{i}e-4" for i in range(1, 11))
    return recipe(
        tmp_path,
        f"""\
        sweep:
          grid:
            optimizer.lr: [{values}]
            seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
            optimizer.weight_decay: [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09]
        """,
    )


def test_plan_of_1000_variants_is_fast(tmp_path: Path) -> None:
    """`regimen plan` of a 10x10x10 grid in-process.

    Measured ~0.1 s CPU for the expansion and ~0.3 s (--json) / ~0.5 s (text, mostly rich
    rendering) for the whole command. The bound is on CPU time, loose, so that a loaded
    machine does not make it flaky; wall time only has to stay sane.
    """
    path = write_1000(tmp_path)
    load_recipe(path)  # imports done outside the timing
    for args in (["plan", str(path), "--json"], ["plan", str(path)]):
        cpu, wall = time.process_time(), time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as info:
            main(args)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        assert info.value.code == 0
        assert cpu < 3, f"{args}: {cpu:.2f}s CPU"
        assert wall < 30, f"{args}: {wall:.2f}s wall"
    cpu = time.process_time()
    variants = expand(load_recipe(path))
    assert time.process_time() - cpu < 3
    assert len(variants) == 1000 and len({v.name for v in variants}) == 1000


def test_plan_json_lists_every_variant(tmp_path: Path) -> None:
    path = write_1000(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["plan", str(path), "--json"])
    plan = json.loads(out.getvalue())
    assert len(plan["variants"]) == 1000
    assert plan["variants"][0]["assignments"] == {
        "optimizer.lr": 0.0001,
        "seed": 0,
        "optimizer.weight_decay": 0.0,
    }
