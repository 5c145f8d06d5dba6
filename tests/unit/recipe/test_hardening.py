"""Bad input, hardened: the malformed corpus covers every category of the hardening issue,
every bad recipe is refused in bounded time *and memory*, and a refused recipe launches
nothing (no Ray, no MLflow run, no storage). Also: `regimen plan` names user code, and
`extends` cannot escape through a symlink.

The memory bound is measured in a fresh subprocess (tracemalloc peak per file and the
process's peak RSS growth), so that it is not polluted by what other tests allocated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO
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


# ---- bounded time and memory, in a fresh process -------------------------------------------

_PROBE = textwrap.dedent(
    """
    import json, resource, sys, time, tracemalloc
    from pathlib import Path
    from orchestrator.errors import RecipeError
    from orchestrator.recipe.expand import expand
    from orchestrator.recipe.loader import load_recipe

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    load_recipe(sys.argv[1])  # warm every lazy import on a valid recipe
    base = rss_mb()
    out = {}
    tracemalloc.start()
    for path in sys.argv[2:]:
        tracemalloc.reset_peak()
        start = time.perf_counter()
        try:
            expand(load_recipe(path))
            code = 0
        except RecipeError:
            code = 2
        out[Path(path).name] = {
            "code": code,
            "seconds": time.perf_counter() - start,
            "peak_mb": tracemalloc.get_traced_memory()[1] / 2**20,
        }
    tracemalloc.stop()
    print(json.dumps({"files": out, "rss_growth_mb": rss_mb() - base}))
    """
)


def _nasty_files(root: Path) -> list[Path]:
    """Generated inputs right at (or over) the loader's limits."""
    files = {
        # just under the 1 MB limit: 60k keys in the free-form model.config mapping
        "wide_mapping.yaml": "name: n\nschedule: {steps: 2}\nmodel:\n  config:\n"
        + "".join(f"    k{i}: {i}\n" for i in range(60_000)),
        # 1 MB+ in one line
        "one_line.yaml": "name: n\nschedule: {steps: 2}\ndescription: " + "x" * 1_100_000 + "\n",
        # 400k-deep flow nesting (the limit is 64 levels; PyYAML must not recurse that deep)
        "deep_flow.yaml": "name: n\nschedule: {steps: 2}\nx: " + "[" * 400_000 + "\n",
        # a 900-element anchor referenced 900 times: 810k values
        "alias_fanout.yaml": "name: n\nschedule: {steps: 2}\na: &a ["
        + ",".join(["1"] * 900)
        + "]\nmodel:\n  config:\n    b: ["
        + ",".join(["*a"] * 900)
        + "]\n",
        # a 500k-digit integer (Python's int parser limit is 4300 digits)
        "long_int.yaml": "name: n\nschedule: {steps: " + "9" * 500_000 + "}\n",
        # a 500k-character key
        "long_key.yaml": "name: n\nschedule: {steps: 2}\n" + "k" * 500_000 + ": 1\n",
        # NUL and invalid UTF-8 in the middle
        "binary.yaml": "name: n\nschedule: {steps: 2}\n",
    }
    out = []
    for name, text in files.items():
        path = root / name
        path.write_text(text)
        out.append(path)
    (root / "binary.yaml").write_bytes(b"name: n\x00\xff\xfe\nschedule: {steps: 2}\n" * 1000)
    return out


def test_bad_input_is_refused_in_bounded_time_and_memory(tmp_path: Path) -> None:
    corpus = sorted(p for p in CORPUS.glob("*.yaml") if p.name != "expected.yaml")
    nasty = _nasty_files(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(CORPUS / "bases" / "valid.yaml")]
        + [str(p) for p in corpus + nasty],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    files = report["files"]
    for path in corpus:
        assert files[path.name]["code"] == 2, path.name
    for path in nasty:
        r = files[path.name]
        assert r["code"] == 2 or path.name == "wide_mapping.yaml", (path.name, r)
    slow = {n: round(r["seconds"], 2) for n, r in files.items() if r["seconds"] > 5}
    hungry = {n: round(r["peak_mb"], 1) for n, r in files.items() if r["peak_mb"] > 64}
    assert not slow, f"over 5 s: {slow}"
    assert not hungry, f"tracemalloc peak over 64 MB: {hungry}"
    assert report["rss_growth_mb"] < 256, report["rss_growth_mb"]


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


def test_refused_recipe_in_a_real_process_starts_no_ray(tmp_path: Path) -> None:
    """`regimen run` as a real process on an unsafe-tag recipe: exit 2, no Ray session dir."""
    ray_tmp = tmp_path / "raytmp"
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(
        "name: evil\nschedule: {steps: 2}\n"
        f"description: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(recipe)],
        cwd=tmp_path,
        env={**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{recipe}:3: <recipe>:" in proc.stderr
    assert not marker.exists() and not ray_tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.yaml"]


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
