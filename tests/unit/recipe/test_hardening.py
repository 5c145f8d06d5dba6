"""Bad input, hardened: the malformed corpus covers every category of the hardening issue,
and a refused recipe launches nothing (no Ray, no MLflow run, no storage). Also: `regimen
plan` names user code, and `extends` cannot escape through a symlink.

The checks that need a process of their own (bounded time and memory, a real `regimen run`)
are in tests/integration/recipe/test_hardening_processes.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cli import main

CORPUS = Path(__file__).parent / "malformed"
EXPECTED: dict[str, dict[str, Any]] = yaml.safe_load((CORPUS / "expected.yaml").read_text())

# Category of the hardening issue -> corpus file prefixes (or names) that exercise it.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "syntax errors": ("syntax_",),
    "wrong types": ("type_", "non_string_key", "top_level_"),
    "unknown keys": ("unknown_",),
    "out of range": ("range_", "huge_integer"),
    "contradictory settings": ("cross_", "ds_", "warmup_", "min_lr_above_lr"),
    "huge / deeply nested": ("deep_nesting_", "huge_integer"),
    "python-object tags": ("tag_python_",),
    "alias bombs": ("bomb_",),
    "paths escaping the working dir": ("extends_escapes_up", "extends_absolute"),
    "non-UTF-8 bytes": ("non_utf8_",),
    "empty file": ("empty", "comments_only"),
}
# Every section where an unknown key must be caught, with its line (dotted key prefixes).
UNKNOWN_KEY_LEVELS = [
    "",  # top level
    "model.",
    "data.",
    "optimizer.",
    "schedule.",
    "checkpoint.",
    "resources.",
    "tracking.",
    "sweep.",
    "stability.",
    "deepspeed.zero_optimization.",
    "techniques.",  # an unknown technique
    "techniques.warmup.",
    "techniques.lisa.",
    "techniques.dropout.",
    "techniques.sgg.",
    "techniques.fault_injection.",
]


def _names(prefix: str) -> list[str]:
    return [n for n in EXPECTED if n.startswith(prefix)]


@pytest.mark.parametrize("category", sorted(CATEGORIES))
def test_corpus_covers_category(category: str) -> None:
    found = sorted({n for p in CATEGORIES[category] for n in _names(p)})
    assert found, f"no corpus file for {category!r}: add one to {CORPUS}"


def test_unknown_keys_are_caught_at_every_level() -> None:
    unknown = {
        w["key"] for n, w in EXPECTED.items() if n.startswith("unknown_") and w["line"] is not None
    }
    for level in UNKNOWN_KEY_LEVELS:
        depth = level.count(".")
        hits = [k for k in unknown if k.startswith(level) and k.count(".") in (depth, depth + 1)]
        if level == "":
            hits = [k for k in unknown if "." not in k]
        assert hits, f"no unknown-key case directly under {level or '<top level>'!r}"


def test_zero_keys_match_installed_deepspeed() -> None:
    """The static ZeRO key list used at validate time is what DeepSpeed itself accepts."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from orchestrator.recipe.deepspeed import ZERO_KEYS

    accepted = set(DeepSpeedZeroConfig.model_fields)
    accepted |= {f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias}
    assert accepted == ZERO_KEYS


# ---- refused recipes launch nothing --------------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Record (and refuse) any attempt to start Ray, open an MLflow run or train."""
    import ray

    import orchestrator.cluster.launch as launch
    import orchestrator.tracking.runs as runs

    calls: list[str] = []

    def refuse(name: str) -> Any:
        def fn(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called for a bad recipe")

        return fn

    monkeypatch.setattr(ray, "init", refuse("ray.init"))
    monkeypatch.setattr(launch, "ensure_ray", refuse("ensure_ray"))
    monkeypatch.setattr(runs, "open_run", refuse("open_run"))
    monkeypatch.chdir(tmp_path)
    return calls


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_refused_recipe_launches_nothing(
    name: str, no_launch: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", str(CORPUS / name), "--json"])
    captured = capsys.readouterr()
    assert exc.value.code == 2, captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""  # no JSON summary: nothing ran
    assert no_launch == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/, no mlflow.db


def test_extends_cannot_escape_through_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "base.yaml").write_text("name: base\nschedule: {steps: 2}\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "link.yaml").symlink_to(outside / "base.yaml")
    (work / "r.yaml").write_text("extends: link.yaml\nname: child\n")
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit) as exc:
        main(["validate", "r.yaml"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "r.yaml:1: extends:" in err and "outside the recipe's directory" in err


# ---- user code is named, never run, by `regimen plan` -------------------------------------

FACTORY_MODULE = """
from pathlib import Path
Path(__file__).with_name("imported.marker").write_text("imported")
def build_model(**kw):
    raise RuntimeError("plan must not call factories")
def build_data(**kw):
    raise RuntimeError("plan must not call factories")
"""


def test_plan_names_user_code_without_running_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "userpkg_h9.py").write_text(FACTORY_MODULE)
    (tmp_path / "r.yaml").write_text(
        "name: custom\nschedule: {steps: 4}\nresources: {workers: 1}\n"
        "model: {kind: factory, factory: 'userpkg_h9:build_model', factory_args: {width: 8}}\n"
        "data: {kind: factory, factory: 'userpkg_h9:build_data'}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        main(["plan", "r.yaml", "--json"])
    assert exc.value.code == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (variant,) = plan["variants"]
    assert variant["user_code"] == [
        "model.factory: userpkg_h9:build_model",
        "data.factory: userpkg_h9:build_data",
    ]
    with pytest.raises(SystemExit):
        main(["plan", "r.yaml"])
    text = capsys.readouterr().out
    assert "runs user code model.factory: userpkg_h9:build_model" in text
    assert "runs user code data.factory: userpkg_h9:build_data" in text
    assert not (tmp_path / "imported.marker").exists()  # named, not imported
