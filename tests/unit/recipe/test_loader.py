"""The loader: YAML with lines, `extends`, overrides, did-you-mean, all problems at once."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from orchestrator.errors import Problem, RecipeError
from orchestrator.recipe.loader import (
    OVERRIDE_FILE,
    dump_recipe,
    load_recipe,
    load_recipe_text,
    parse_override,
)

REPO = Path(__file__).resolve().parents[3]

BASE = """\
name: base
schedule:
  steps: 100
  micro_batch_size: 4
optimizer:
  name: adamw
  lr: 1.0e-3
  betas: [0.9, 0.95]
model:
  config:
    hidden_size: 32
    num_hidden_layers: 2
data:
  kind: text_files
  paths: [a.txt, b.txt, c.txt]
resources:
  workers: 1
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path, *overrides: str) -> list[Problem]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return info.value.problems


def line_of(path: Path, text: str) -> int:
    """1-based line of the first line of ``path`` containing ``text``."""
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if text in line:
            return i
    raise AssertionError(f"{text!r} not in {path}")


# ------------------------------------------------------------------------------ extends


def test_extends_deep_merges_and_child_wins(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(
        tmp_path,
        "child.yaml",
        """\
        extends: base.yaml
        name: child
        optimizer:
          lr: 3.0e-3
        model:
          config:
            num_hidden_layers: 4
        data:
          paths: [z.txt]
        """,
    )
    loaded = load_recipe(child)
    r = loaded.recipe
    assert r.name == "child"
    assert r.optimizer.lr == 0.003 and r.optimizer.name == "adamw"  # merged, child wins
    assert r.model.config == {"hidden_size": 32, "num_hidden_layers": 4}
    assert r.data.paths == ["z.txt"]  # lists are replaced, not merged
    assert r.schedule.steps == 100
    assert "extends" not in loaded.data
    # lines point into the file that wrote the key
    assert loaded.lines["optimizer.lr"] == (str(child), line_of(child, "lr: 3.0e-3"))
    assert loaded.lines["optimizer.name"][0].endswith("base.yaml")
    assert loaded.lines["model.config.num_hidden_layers"][0] == str(child)
    assert loaded.lines["model.config.hidden_size"][0].endswith("base.yaml")
    assert "data.paths.2" not in loaded.lines  # the base's longer list is gone


def test_extends_errors_point_into_the_right_file(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", BASE.replace("micro_batch_size: 4", "micro_batch: 4"))
    child = write(
        tmp_path,
        "child.yaml",
        """\
        extends: base.yaml
        optimizer:
          lr: -1
        """,
    )
    problems = {p.key: p for p in problems_of(child)}
    assert problems["schedule.micro_batch"].file == str(base.resolve())
    assert problems["schedule.micro_batch"].line == line_of(base, "micro_batch: 4")
    assert problems["optimizer.lr"].file == str(child)
    assert problems["optimizer.lr"].line == line_of(child, "lr: -1")


def test_extends_chain_and_subdirectory(tmp_path: Path) -> None:
    write(tmp_path, "bases/root.yaml", BASE)
    write(tmp_path, "bases/mid.yaml", "extends: root.yaml\nseed: 7\n")
    leaf = write(tmp_path, "leaf.yaml", "extends: bases/mid.yaml\nname: leaf\n")
    r = load_recipe(leaf).recipe
    assert (r.name, r.seed, r.schedule.steps) == ("leaf", 7, 100)


def test_extends_too_deep(tmp_path: Path) -> None:
    write(tmp_path, "r0.yaml", BASE)
    for i in range(1, 12):
        write(tmp_path, f"r{i}.yaml", f"extends: r{i - 1}.yaml\n")
    (problem,) = problems_of(tmp_path / "r11.yaml")
    assert problem.key == "extends" and "levels of `extends`" in problem.message


def test_extends_escaping_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "outside/base.yaml", BASE)
    child = write(tmp_path, "inside/deeper/child.yaml", "extends: ../../outside/base.yaml\n")
    monkeypatch.chdir(tmp_path / "inside")
    (problem,) = problems_of(child)
    assert problem.key == "extends" and "outside" in problem.message and problem.line == 1
    monkeypatch.chdir(tmp_path)  # the working directory holds the base: allowed
    assert load_recipe(child).recipe.name == "base"


def test_extends_symlink_out_of_the_tree_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere, "base.yaml", BASE)
    work = tmp_path / "work"
    work.mkdir()
    (work / "base.yaml").symlink_to(elsewhere / "base.yaml")
    child = write(work, "child.yaml", "extends: base.yaml\n")
    monkeypatch.chdir(work)
    (problem,) = problems_of(child)
    assert "outside" in problem.message


# ---------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("optimizer.lr=3e-3", "optimizer.lr", 0.003),
        ("optimizer.lr=3E-3", "optimizer.lr", 0.003),
        ("optimizer.lr=1.5e+2", "optimizer.lr", 150.0),
        ("schedule.steps=100", "schedule.steps", 100),
        ("optimizer.betas=[0.9,0.99]", "optimizer.betas", [0.9, 0.99]),
        ("model.config={hidden_size: 64}", "model.config", {"hidden_size": 64}),
        ("tracking.run_name=hello world", "tracking.run_name", "hello world"),
        ("tracking.run_name=", "tracking.run_name", ""),
        ("checkpoint.at_end=false", "checkpoint.at_end", False),
        ("description=a: b", "description", {"a": "b"}),  # YAML, as in a file
        ("description=[unclosed", "description", "[unclosed"),
        ("tracking.uri=sqlite:///x.db", "tracking.uri", "sqlite:///x.db"),
        (" seed = 3", "seed", 3),
    ],
)
def test_parse_override(text: str, key: str, value: object) -> None:
    assert parse_override(text) == (key, value)


@pytest.mark.parametrize(
    "text", ["optimizer.lr", "=3", ".lr=3", "a..b=1", "optimizer.=1", "a b=1", "extends=x.yaml"]
)
def test_parse_override_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="override|extends"):
        parse_override(text)


def test_overrides_apply_and_are_located_on_the_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", BASE)
    loaded = load_recipe(path, ["optimizer.lr=3e-3", "optimizer.betas=[0.8,0.9]", "seed=5"])
    r = loaded.recipe
    assert isinstance(r.optimizer.lr, float) and r.optimizer.lr == 0.003
    assert r.optimizer.betas == (0.8, 0.9) and r.seed == 5
    assert loaded.lines["optimizer.lr"] == (OVERRIDE_FILE, 1)
    assert "optimizer.betas.1" not in loaded.lines  # the file's items no longer apply

    problems = problems_of(path, "seed=1", "optimizer.lrr=1", "bad", "schedule.steps=0")
    assert [(p.file, p.line, p.key) for p in problems] == [
        (OVERRIDE_FILE, 2, "optimizer.lrr"),
        (OVERRIDE_FILE, 3, "bad"),
        (OVERRIDE_FILE, 4, "schedule.steps"),
    ]
    assert "did you mean 'lr'" in problems[0].message
    assert "dotted.key=value" in problems[1].message


def test_override_of_a_sweep_list_keeps_the_dotted_key(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", BASE)
    loaded = load_recipe(path, ["sweep.grid.optimizer.lr=[1e-3,2e-3]", "sweep.zip.seed=[1,2]"])
    assert loaded.recipe.sweep is not None
    assert loaded.recipe.sweep.grid == {"optimizer.lr": [0.001, 0.002]}
    assert loaded.recipe.sweep.zip == {"seed": [1, 2]}


def test_floats_in_yaml_1_2_style(tmp_path: Path) -> None:
    """`3e-3` is a string in YAML 1.1; the loader reads it as a number everywhere."""
    path = write(
        tmp_path,
        "r.yaml",
        BASE
        + "deepspeed:\n  zero_optimization: {stage: 1, reduce_bucket_size: 5e8}\n"
        + "sweep:\n  grid:\n    optimizer.lr: [1e-3, 3e-3]\n",
    )
    loaded = load_recipe(path)
    assert loaded.recipe.deepspeed["zero_optimization"]["reduce_bucket_size"] == 5e8
    assert loaded.recipe.sweep is not None
    assert loaded.recipe.sweep.grid["optimizer.lr"] == [0.001, 0.003]


# ------------------------------------------------------------------------- did you mean


SMALL = "name: small\nschedule:\n  steps: 3\n"


@pytest.mark.parametrize(
    ("snippet", "key", "line", "hint"),
    [
        ("optimzer:\n  lr: 0.1\n", "optimzer", 1, "did you mean 'optimizer'?"),
        ("schedule_:\n  steps: 3\n", "schedule_", 1, "did you mean 'schedule'?"),
        ("optimizer:\n  learning_rate: 0.1\n", "optimizer.learning_rate", 2, "remove it"),
        ("optimizer:\n  wd: 0.1\n", "optimizer.wd", 2, "allowed here: name, lr"),
        ("lr: 0.1\n", "lr", 1, "did you mean 'optimizer.lr'? (move it there)"),
        ("techniques:\n  warmup:\n    min_lrr: 0.0\n", "techniques.warmup.min_lrr", 3, "'min_lr'"),
        ("checkpoint:\n  Every: 3\n", "checkpoint.Every", 2, "did you mean 'every'?"),
        ("precision: bf61\n", "precision", 1, "did you mean 'bf16'?"),
        ("stability:\n  windw: 8\n", "stability.windw", 2, "did you mean 'window'?"),
    ],
)
def test_did_you_mean(tmp_path: Path, snippet: str, key: str, line: int, hint: str) -> None:
    path = write(tmp_path, "r.yaml", SMALL + snippet)
    (problem,) = problems_of(path)
    assert (problem.key, problem.line) == (key, SMALL.count("\n") + line)
    assert hint in problem.message


def test_every_problem_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "r.yaml",
        """\
        name: five mistakes
        schedule:
          steps: ten
        optimizer:
          name: adamx
          lr: -1
        checkpoint:
          evry: 10
        """,
    )
    problems = problems_of(path)
    assert [(p.line, p.key) for p in problems] == [
        (1, "name"),
        (3, "schedule.steps"),
        (5, "optimizer.name"),
        (6, "optimizer.lr"),
        (8, "checkpoint.evry"),
    ]


def test_unknown_keys_do_not_hide_cross_section_checks(tmp_path: Path) -> None:
    """An unknown key and a contradiction (warmup longer than training) are both reported."""
    path = write(
        tmp_path,
        "r.yaml",
        BASE
        + "tracking:\n  experimnt: x\n"
        + "deepspeed:\n  train_micro_batch_size_per_gpu: 16\n"
        + "techniques:\n  warmup:\n    warmup_steps: 500\n",
    )
    keys = [p.key for p in problems_of(path)]
    assert keys == [
        "tracking.experimnt",
        "deepspeed.train_micro_batch_size_per_gpu",
        "techniques.warmup.warmup_steps",
    ]


def test_problems_are_one_line_each_and_sorted(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", BASE + "'multi\n\n  line': 1\nseed: -3\n")
    problems = problems_of(path)
    assert [p.line for p in problems] == sorted(p.line or 0 for p in problems)
    for p in problems:
        assert "\n" not in str(p)


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", BASE + "seed: 1\nseed: 2\n")
    (problem,) = problems_of(path)
    assert problem.key == "seed" and "duplicate" in problem.message
    assert problem.line == BASE.count("\n") + 2


def test_merge_keys_work_with_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "r.yaml",
        """\
        name: merged
        defaults: &defaults
          lr: 0.002
          name: sgd
        schedule: {steps: 3}
        optimizer:
          <<: *defaults
          lr: -1
        """,
    )
    problems = problems_of(path)
    by_key = {p.key: p for p in problems}
    assert by_key["optimizer.lr"].line == 8  # the key written here wins over the merged one
    assert "defaults" in by_key


# ------------------------------------------------------------------- round trip, hashes


def test_dump_and_load_text_round_trip() -> None:
    loaded = load_recipe(REPO / "recipes" / "quickstart.yaml")
    text = dump_recipe(loaded.recipe)
    again = load_recipe_text(text, name="mlflow/recipe.yaml")
    assert again == loaded.recipe
    assert dump_recipe(again) == text


def test_sha256_is_stable_and_content_addressed(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", BASE)
    # the same regime written differently: keys reordered, a default spelled out
    b = write(
        tmp_path,
        "b.yaml",
        "resources: {workers: 1}\n" + BASE.replace("resources:\n  workers: 1\n", "seed: 0\n"),
    )
    first, second = load_recipe(a), load_recipe(b)
    assert first.sha256 == load_recipe(a).sha256 == second.sha256
    assert len(first.sha256) == 64
    assert load_recipe(a, ["seed=1"]).sha256 != first.sha256


def test_load_recipe_text_reports_with_its_name() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe_text("name: x\nschedule: {steps: 0}\n", name="run123/recipe.yaml")
    (problem,) = info.value.problems
    assert str(problem).startswith("run123/recipe.yaml:2: schedule.steps: ")
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{x}: &{x} [{', '.join(['*' + y] * 10)}]\n" for x, y in zip("bcdef", "abcde", strict=True)
    )
    with pytest.raises(RecipeError, match="aliases"):
        load_recipe_text(bomb)
    for text in ("", "[1, 2]", "a: [", "x: !!python/name:os.system\n"):
        with pytest.raises(RecipeError):
            load_recipe_text(text)


def test_data_keeps_the_sweep_and_drops_extends(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "c.yaml", "extends: base.yaml\nsweep:\n  grid:\n    seed: [1, 2]\n")
    loaded = load_recipe(child)
    assert loaded.data["sweep"] == {"grid": {"seed": [1, 2]}}
    assert "extends" not in loaded.data
    assert loaded.lines["sweep.grid.seed"] == (str(child), 4)
    assert loaded.lines["sweep.grid.seed.1"] == (str(child), 4)


def test_quickstart_and_ci_recipes_are_valid() -> None:
    for path in [
        REPO / "recipes" / "quickstart.yaml",
        *sorted((REPO / "recipes").glob("ci/*.yaml")),
    ]:
        assert load_recipe(path).recipe.name


@pytest.mark.parametrize("depth", [65, 999, 1_001, 20_000])
@pytest.mark.parametrize("style", ["flow", "block"])
def test_deep_nesting_is_reported_the_same_at_any_depth(
    tmp_path: Path, depth: int, style: str
) -> None:
    """libyaml stops at about 1,000 levels with its own wording (PyYAML 6.0.4): the message
    and its line must not depend on which limit is hit first."""
    if style == "flow":
        nested = "[" * depth + "]" * depth
        line = 3
    else:  # `- - - 1`: one block sequence inside the next, two bytes a level
        nested = "\n  " + "- " * depth + "1"
        line = 4
    path = write(tmp_path, "deep.yaml", f"name: deep\nschedule: {{steps: 2}}\nx: {nested}\n")
    (problem,) = problems_of(path)
    assert "nested deeper than 64 levels" in problem.message, problem.message
    assert problem.line == line


# ---- deepspeed: PATH ------------------------------------------------------------------------

DS_RECIPE = "name: ds\nschedule: {steps: 4}\nresources: {workers: 1}\n"


def test_deepspeed_path_is_relative_to_the_file_that_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "ds.json").write_text(
        '{\n  "zero_optimization": {"stage": 2},\n  "gradient_clipping": "auto"\n}\n'
    )
    (tmp_path / "base" / "base.yaml").write_text(DS_RECIPE + "deepspeed: ds.json\n")
    (tmp_path / "child.yaml").write_text("extends: base/base.yaml\nname: child\n")
    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(tmp_path / "child.yaml")
    assert loaded.recipe.zero_stage == 2
    assert loaded.lines["deepspeed.zero_optimization"] == (str(tmp_path / "base/ds.json"), 2)
    assert "ds.json" not in loaded.yaml_text  # workers get the config, not the path


def test_deepspeed_path_from_an_override_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "r.yaml").write_text(DS_RECIPE)
    (tmp_path / "z1.yaml").write_text("zero_optimization:\n  stage: 1\n  overlap_com: true\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "r.yaml", ["deepspeed=z1.yaml"])
    (problem,) = info.value.problems
    assert (problem.file, problem.line) == (str(tmp_path / "z1.yaml"), 3)
    assert "did you mean 'overlap_comm'" in problem.message


def test_deepspeed_path_cannot_escape_through_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "ds.json").write_text('{"zero_optimization": {"stage": 1}}')
    work = tmp_path / "work"
    work.mkdir()
    (work / "ds.json").symlink_to(outside / "ds.json")
    (work / "r.yaml").write_text(DS_RECIPE + "deepspeed: ds.json\n")
    monkeypatch.chdir(work)
    with pytest.raises(RecipeError) as info:
        load_recipe(work / "r.yaml")
    (problem,) = info.value.problems
    assert problem.key == "deepspeed" and problem.line == 4
    assert "outside the recipe's directory" in problem.message


def test_deepspeed_file_must_hold_a_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ds.json").write_text('[\n  {"stage": 2}\n]\n')
    (tmp_path / "r.yaml").write_text(DS_RECIPE + "deepspeed: ds.json\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "r.yaml")
    (problem,) = info.value.problems
    assert problem.file == str(tmp_path / "ds.json") and problem.line == 1
    assert "DeepSpeed config must be a mapping" in problem.message
