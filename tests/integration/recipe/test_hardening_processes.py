"""Bad input, hardened, in real processes: every bad recipe is refused in bounded time *and
memory*, and a refused `regimen run` starts no Ray (moved from
tests/unit/recipe/test_hardening.py: each starts a Python process that imports the package).

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

import pytest
from unit.recipe.test_hardening import CORPUS

from conftest import REPO

pytestmark = pytest.mark.integration


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
