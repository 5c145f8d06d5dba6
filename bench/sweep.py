"""A 20-variant sweep of recipes/ci/tiny.yaml at concurrency 1 against one variant, side by side.

Both arms run in one process on one embedded Ray (its start is timed apart): "one" is a
single variant (`regimen run` of the tiny recipe, minus CLI and Ray start), "sweep" is
`--variants` variants over `seed` under one parent run, at concurrency 1. The figure is
the ratio sweep / one, also with Ray's start added to both (what `regimen run` of each
compares; the issue's target: <= 3 at 20 variants). Printed too: the mean wall time per
variant, the driver's per-variant costs (MLflow run open, checkpoints logged,
summary, run end), and the resident memory of every worker actor after each variant (a
warm group must not grow).

    python bench/sweep.py [--variants 20] [--launcher workers|ray_train]
        [--ablate]   # also: the per-variant cost of export, log_model, checkpoints (5 each)

Run it under the heavy lock on a shared machine and note `uptime` beside the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.cluster.workers import WorkerPool
from orchestrator.recipe.expand import expand
from orchestrator.recipe.loader import load_recipe

COSTS: dict[str, list[float]] = defaultdict(list)


class MeasuringPool(WorkerPool):
    """Samples every actor's RSS each time a group comes back from a clean job."""

    def __init__(self) -> None:
        super().__init__()
        self.rss: dict[int, list[int]] = defaultdict(list)

    def release(self, group: Any) -> None:
        if group.healthy:
            for pid, rss in zip(group.pids, group.memory(), strict=True):
                self.rss[pid].append(rss)
        super().release(group)


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            COSTS[name].append(time.perf_counter() - started)

    return wrapper


@contextlib.contextmanager
def driver_costs() -> Iterator[None]:
    """Time the driver's per-variant MLflow work (the names the controller calls)."""
    from orchestrator.control import controller
    from orchestrator.tracking import record, runs

    patched = [
        (controller, "open_job_run"),
        (runs, "end_run"),
        (runs, "log_summary"),
        (record, "log_checkpoints"),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name in patched]
    for mod, name, fn in saved:
        setattr(mod, name, _timed(name, fn))
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _recipe(root: Path, launcher: str, variants: int) -> Path:
    data = yaml.safe_load((REPO / "recipes" / "ci" / "tiny.yaml").read_text())
    data["checkpoint"]["storage"] = str(root / "runs")
    data["tracking"]["uri"] = f"sqlite:///{root.parent}/mlflow.db"  # one store, all arms
    data["resources"]["launcher"] = launcher
    if variants > 1:
        data["sweep"] = {"grid": {"seed": list(range(variants))}, "max_concurrent": 1}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(root: Path, launcher: str, variants: int, overrides: list[str], pool: Any) -> float:
    from orchestrator.control.controller import run_variants

    root.mkdir(parents=True)
    loaded = load_recipe(_recipe(root, launcher, variants), overrides)
    started = time.perf_counter()
    results = run_variants(expand(loaded), recipe_name="bench", max_concurrent=1, pool=pool)
    wall = time.perf_counter() - started
    bad = [r for r in results if r.status != "FINISHED"]
    if bad:
        raise SystemExit(f"{len(bad)} variant(s) did not finish: {bad[0].error}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=20)
    parser.add_argument("--launcher", choices=["workers", "ray_train"], default="workers")
    parser.add_argument("--ablate", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    from orchestrator.cluster.launch import ensure_ray

    root = Path(tempfile.mkdtemp(prefix="regimen-sweep-"))
    started = time.perf_counter()
    ensure_ray()
    ray_s = time.perf_counter() - started
    load = os.getloadavg()
    try:
        # MLflow's store migrations are paid once, before either arm (the startup helper's
        # subject); the first arm would otherwise carry them
        _run(root / "warmup", args.launcher, 1, ["schedule.steps=4"], None)
        one = _run(root / "one", args.launcher, 1, [], None)
        pool = MeasuringPool()
        with driver_costs():
            sweep = _run(root / "sweep", args.launcher, args.variants, [], pool)
        pool.shutdown()
        out: dict[str, Any] = {
            "launcher": args.launcher,
            "variants": args.variants,
            "ray_init_s": round(ray_s, 2),
            "one_variant_s": round(one, 2),
            "sweep_s": round(sweep, 2),
            "ratio": round(sweep / one, 2),
            # what `regimen run` of each would compare: both also start Ray
            "ratio_with_ray_init": round((sweep + ray_s) / (one + ray_s), 2),
            "per_variant_s": round(sweep / args.variants, 2),
            "driver_costs_median_s": {
                k: round(statistics.median(v), 3) for k, v in sorted(COSTS.items())
            },
            "actor_rss_mb": {
                str(pid): [round(r / 2**20) for r in samples] for pid, samples in pool.rss.items()
            },
            "loadavg_at_start": [round(x, 2) for x in load],
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        }
        if args.ablate:  # what a variant pays for each end-of-job item, 5 variants each
            base = _run(root / "abl-base", args.launcher, 5, [], None)
            cuts = {
                "export_and_log_model": ["checkpoint.export=false"],
                "log_model": ["tracking.log_model=false"],
                "checkpoints": ["checkpoint.every=1000"],
            }
            out["per_variant_cost_s"] = {
                name: round((base - _run(root / f"abl-{name}", args.launcher, 5, o, None)) / 5, 3)
                for name, o in cuts.items()
            }
        print(json.dumps(out, indent=1))
        print(
            f"\nSWEEP {args.launcher}: {args.variants} variants {sweep:.1f} s vs one variant "
            f"{one:.1f} s: ratio {sweep / one:.2f} (target <= 3); load {load[0]:.2f}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
