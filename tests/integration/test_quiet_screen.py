"""The first screen of `regimen run`: a real subprocess of recipes/ci/tiny.yaml (real local
Ray, real MLflow sqlite) shows Regimen's own lines only and ends with where to look;
Ray's and MLflow's chatter is in the run's logs/driver.log; ``--verbose`` shows it again."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration

# A library's log line: Ray's "2026-12-01 14:37:49,811\tWARNING ...", MLflow's
# "2026/12/01 14:37:55 INFO mlflow...", DeepSpeed's "[2026-12-01 14:37:55,000] [INFO] ..."
TIMESTAMPED = re.compile(r"^\[?\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d", re.MULTILINE)
CHATTER = ("INFO worker.py", "Started a local Ray", "mlflow.store", "Token authentication",
           "Creating initial MLflow database tables", "alembic")  # fmt: skip


def _regimen(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    # a cache of its own: no migrated store template yet, so MLflow migrates (and says so)
    env = {**os.environ, "PYTHONPATH": str(REPO), "REGIMEN_CACHE_DIR": str(cwd / "cache")}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    return proc, proc.stdout + proc.stderr


def test_run_shows_regimen_lines_and_where_to_look_and_verbose_brings_the_chatter_back(tmp_path):
    quiet, loud = tmp_path / "quiet", tmp_path / "verbose"
    for d in (quiet, loud):
        d.mkdir()
        shutil.copy(REPO / "recipes/ci/tiny.yaml", d / "tiny.yaml")

    proc, screen = _regimen(quiet, "run", "tiny.yaml")
    assert proc.returncode == 0, screen[-4000:]
    for pattern in CHATTER:
        assert pattern not in screen, screen
    assert not TIMESTAMPED.search(screen), screen
    run_id = re.search(r"run=([0-9a-f]{32})", screen).group(1)  # type: ignore[union-attr]
    run_dir = quiet / "runs" / run_id
    lines = screen.splitlines()
    assert lines[0].startswith("FINISHED tiny: steps=20 ") and lines[0].endswith(run_id)
    assert lines[1:] == [
        f"  MLflow      mlflow ui --backend-store-uri sqlite:///{quiet}/mlflow.db",
        f"  audit       regimen audit {run_id}",
        f"  checkpoint  {run_dir}/checkpoints/step-00000020",
        f"  model       {run_dir}/export",
        f"  logs        {run_dir}/logs/driver.log",
    ]
    assert (run_dir / "checkpoints/step-00000020/manifest.json").is_file()
    assert (run_dir / "export/config.json").is_file()
    log = (run_dir / "logs/driver.log").read_text()
    assert log.startswith("=== regimen run (")
    # (Ray's token warning comes only where it has to set token auth up: not asserted here)
    for pattern in ("Started a local Ray", "Creating initial MLflow database tables"):
        assert pattern in log, log

    proc, screen = _regimen(loud, "run", "tiny.yaml", "--verbose", "--json")
    assert proc.returncode == 0, screen[-4000:]
    assert "Started a local Ray" in proc.stderr and "Creating initial MLflow" in proc.stderr
    assert TIMESTAMPED.search(proc.stderr)
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith('{"variant": "tiny"')
