"""The malformed-recipe corpus: every file fails `regimen validate` cleanly.

Each file in ``malformed/`` is one kind of mistake (syntax, unsafe tags, alias bombs,
unknown keys at every level, wrong types, out-of-range values, contradictions,
`extends` escapes and cycles, broken sweeps). ``malformed/expected.yaml`` gives, per
file, the dotted key that must be reported, a fragment of its message and (mostly)
the exact line. Every one must exit 2, print no traceback, print every problem as
``FILE:LINE: dotted.key: message`` with a fix, and finish within seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import orchestrator.recipe.expand  # noqa: F401  (imported once here, not inside the timing)
from orchestrator.cli import main

CORPUS = Path(__file__).parent / "malformed"
EXPECTED: dict[str, dict[str, Any]] = yaml.safe_load((CORPUS / "expected.yaml").read_text())
REPO = Path(__file__).resolve().parents[3]
PROBLEM = re.compile(r"^(?P<file>.+?):(?P<line>\d+|\?): (?P<key>[\w.\-<>]*): (?P<message>.+)$")
FIX_WORDS = re.compile(
    r"did you mean|e\.g\.|\b(needs|set|use|remove|add|give|write|fix|change|raise|lower|rename|"
    r"quote|keep|define|indent|save|check|shorten|start|copy|merge|make|move|split|flatten|"
    r"list|train)\b"
)


def run_validate(path: Path | str, *args: str, capsys: Any) -> tuple[int, str, float]:
    """`regimen validate PATH ARGS` in-process: exit code, stderr, seconds."""
    start = time.perf_counter()
    try:
        main(["validate", str(path), *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    elapsed = time.perf_counter() - start
    return code, capsys.readouterr().err, elapsed


def parse_problems(stderr: str) -> list[dict[str, str]]:
    """Every stderr line as a problem; fails on a line that is not one."""
    problems = []
    for line in stderr.splitlines():
        match = PROBLEM.match(line)
        assert match, f"not FILE:LINE: key: message: {line!r}"
        problems.append(match.groupdict())
    assert problems, "no problem reported"
    return problems


def check_clean_failure(code: int, stderr: str) -> list[dict[str, str]]:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    problems = parse_problems(stderr)
    for p in problems:
        assert FIX_WORDS.search(p["message"]), f"message names no fix: {p['message']!r}"
    return problems


def test_corpus_is_complete() -> None:
    files = {p.name for p in CORPUS.glob("*.yaml")} - {"expected.yaml"}
    assert files == set(EXPECTED), "every corpus file needs an entry in expected.yaml"
    assert len(files) >= 60


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_malformed_recipe(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    want = EXPECTED[name]
    path = CORPUS / name
    code, stderr, elapsed = run_validate(path, capsys=capsys)
    problems = check_clean_failure(code, stderr)
    assert elapsed < 5, f"{name} took {elapsed:.1f}s"
    where = str((CORPUS / want["file"]).resolve()) if "file" in want else str(path)
    hits = [p for p in problems if p["key"] == want["key"] and want["contains"] in p["message"]]
    assert hits, f"expected {want['key']}: ...{want['contains']}... in:\n{stderr}"
    hit = hits[0]
    assert hit["file"] == where, stderr
    if want["line"] is not None:
        assert hit["line"] == str(want["line"]), f"line {hit['line']} != {want['line']}: {stderr}"


def test_line_numbers_point_at_the_offending_key(capsys: pytest.CaptureFixture[str]) -> None:
    """Most corpus entries pin an exact line; make sure that stays the rule, not the exception."""
    exact = [n for n, w in EXPECTED.items() if isinstance(w["line"], int)]
    assert len(exact) >= 80
    code, stderr, _ = run_validate(CORPUS / "unknown_warmup_key.yaml", capsys=capsys)
    assert code == 2
    (problem,) = parse_problems(stderr)
    source = (CORPUS / "unknown_warmup_key.yaml").read_text().splitlines()
    assert source[int(problem["line"]) - 1].strip().startswith("warmup_step:")


def test_unsafe_tag_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(
        f"name: evil\nschedule: {{steps: 2}}\n"
        f"description: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    code, stderr, _ = run_validate(recipe, capsys=capsys)
    check_clean_failure(code, stderr)
    assert not marker.exists()


def test_huge_file_is_refused_quickly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "huge.yaml"
    filler = "".join(f"  key_{i}: {'x' * 60}\n" for i in range(20_000))
    recipe.write_text("name: huge\nschedule: {steps: 2}\nmodel:\n config:\n" + filler)
    assert recipe.stat().st_size > 1_000_000
    code, stderr, elapsed = run_validate(recipe, capsys=capsys)
    (problem,) = check_clean_failure(code, stderr)
    assert "limit is 1000000" in problem["message"]
    assert elapsed < 5


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stderr, _ = run_validate(tmp_path / "nope.yaml", capsys=capsys)
    (problem,) = check_clean_failure(code, stderr)
    assert problem["line"] == "?" and "file not found" in problem["message"]


def test_directory_instead_of_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stderr, _ = run_validate(tmp_path, capsys=capsys)
    (problem,) = check_clean_failure(code, stderr)
    assert "is a directory" in problem["message"]


def test_bad_override_is_reported_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    base = CORPUS / "bases" / "valid.yaml"
    code, stderr, _ = run_validate(base, "optimizer.lr", "schedule.steps=-1", capsys=capsys)
    problems = check_clean_failure(code, stderr)
    assert [(p["file"], p["line"], p["key"]) for p in problems] == [
        ("<command line>", "1", "optimizer.lr"),
        ("<command line>", "2", "schedule.steps"),
    ]


SUBPROCESS_CASES = [
    "tag_python_apply_os_system.yaml",
    "bomb_billion_laughs.yaml",
    "sweep_zip_length_mismatch.yaml",
]


def test_real_subprocesses() -> None:
    """A handful as real `regimen validate` processes (run side by side to save time).

    The bound is loose: starting the CLI imports torch (via the technique modules),
    several seconds on a loaded 2-core machine; the < 5 s bound per file is checked
    in-process above.
    """
    exe = shutil.which("regimen")
    command = [exe] if exe else [sys.executable, "-m", "orchestrator.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = {
        name: subprocess.Popen(
            [*command, "validate", str(CORPUS / name)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in SUBPROCESS_CASES
    }
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        problems = check_clean_failure(proc.returncode, stderr)
        assert any(p["key"] == EXPECTED[name]["key"] for p in problems), stderr
