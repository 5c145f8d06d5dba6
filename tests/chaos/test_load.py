"""Load: many tiny jobs at once, and one long run with checkpoints (retention keeps it flat).

CI sizes by default; the full sizes (50 jobs, 10,000 steps) are marked ``slow`` and run with
``-m slow`` (or REGIMEN_CHAOS_FULL=1 for the CI-named tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from chaos.ckpt_helpers import FULL
from chaos.run_helpers import mlp_recipe, regimen, write_recipe

pytestmark = pytest.mark.chaos


def _many_jobs(tmp_path: Path, jobs: int) -> None:
    """One `regimen run` of a sweep with ``jobs`` variants (seeds), all queued at once on a
    local Ray of 2 CPUs: none lost, all FINISHED in MLflow with every step logged."""
    steps = 10
    recipe = mlp_recipe(
        steps=steps,
        every=0,
        sweep={"grid": {"seed": list(range(jobs))}, "max_concurrent": jobs},
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)
    start = time.monotonic()
    proc = regimen(tmp_path, "run", str(path), "--json")
    out, err = proc.communicate(timeout=3000 if jobs > 10 else 600)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    variants = summary["variants"]
    assert len(variants) == jobs and all(v["status"] == "FINISHED" for v in variants)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`regimen.variant` != ''",
        max_results=1000,
    )
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == jobs, [r.info.status for r in runs]
    for r in finished:
        steps_logged = {m.step for m in client.get_metric_history(r.info.run_id, "loss")}
        assert steps_logged == set(range(1, steps + 1)), r.info.run_id
    # The local Ray holds 2 one-CPU jobs: the rest wait in the driver, not as Ray Train
    # controllers (one process each) in Ray's queue.
    (parent,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`regimen.role` = 'sweep'",
    )
    assert parent.data.tags["regimen.concurrency"] == "2"
    spans = [(r.info.start_time, r.info.end_time) for r in finished]
    assert max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans) <= 2
    print(f"\nLOAD jobs={jobs} finished={len(finished)} lost=0 seconds={elapsed:.0f}")


@pytest.mark.timeout(3600)  # the 50-job size, 2 at a time on 2 CPUs, takes about 15 min
def test_many_jobs_at_once_ci(tmp_path: Path) -> None:
    _many_jobs(tmp_path, 50 if FULL else 6)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_many_jobs_at_once_full(tmp_path: Path) -> None:
    _many_jobs(tmp_path, 50)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


# a training rank's process: the worker group's actor, or Ray Train's worker
WORKER_PROCESS = re.compile(r"RankWorker|TrainWorker")


def _du(path: Path) -> int:
    """Bytes of the committed checkpoints under ``path`` (a save or delete in progress,
    ``.tmp-*``, is transient and not what retention promises to bound)."""
    total = 0
    for step_dir in path.glob("step-*"):
        for p in step_dir.rglob("*"):
            with contextlib.suppress(FileNotFoundError):  # retention removed it meanwhile
                total += p.stat().st_size if p.is_file() else 0
    return total


def _long_run(tmp_path: Path, steps: int) -> None:
    """``steps`` steps, a checkpoint every 100, keep 2: the training worker's RSS and the
    checkpoint directory stay flat after warm-up (retention works, nothing accumulates)."""
    recipe = mlp_recipe(steps=steps, every=100, keep=2)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = regimen(tmp_path, "run", str(path), "--json")
    samples: list[tuple[float, int, int, int]] = []  # (t, worker rss, ckpt bytes, ckpt count)
    start = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - start < 3000:
            workers = [p for p in _tree(proc.pid) if WORKER_PROCESS.search(" ".join(_cmdline(p)))]
            ckpts = list((tmp_path / "runs").glob("*/checkpoints"))
            dirs = [p for p in ckpts[0].iterdir() if p.name.startswith("step-")] if ckpts else []
            if workers and dirs:  # warm-up ends with the first checkpoint (engine built, ran)
                rss = sum(_rss(p) for p in workers)
                samples.append((time.monotonic() - start, rss, _du(ckpts[0]), len(dirs)))
            time.sleep(0.1)  # a quiet machine runs 1,000 tiny steps in a few seconds
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED" and summary["steps"] == steps
    assert len(samples) >= 8, f"too few samples ({len(samples)}) to judge flatness"
    warm = samples[1:]
    rss = [s[1] for s in warm]
    growth_mb = (max(rss[len(rss) // 2 :]) - min(rss[: len(rss) // 2])) / 2**20
    max_count = max(s[3] for s in samples)
    disk = [s[2] for s in warm if s[3] >= 2]
    print(
        f"\nLOAD long-run steps={steps} samples={len(samples)} rss_mb={rss[0] / 2**20:.0f}->"
        f"{rss[-1] / 2**20:.0f} growth_mb={growth_mb:.1f} max_ckpts={max_count} "
        f"disk_kb={min(disk, default=0) // 1024}..{max(disk, default=0) // 1024}"
    )
    assert max_count <= 3, "retention kept more than keep + the one being committed"
    assert growth_mb < 50, f"worker RSS grew {growth_mb:.1f} MB after warm-up"
    if disk:
        assert max(disk) <= 2 * min(disk), "checkpoint disk usage grows"
    final = list((tmp_path / "runs").glob("*/checkpoints/step-*"))
    assert len(final) == 2


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def _rss(p: psutil.Process) -> int:
    try:
        return int(p.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def test_long_run_is_flat_ci(tmp_path: Path) -> None:
    _long_run(tmp_path, 10_000 if FULL else 2_000)


@pytest.mark.slow
def test_long_run_is_flat_full(tmp_path: Path) -> None:
    _long_run(tmp_path, 10_000)
