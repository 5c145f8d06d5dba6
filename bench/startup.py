"""Start-up: `regimen run` of the tiny recipe against the bare DeepSpeed script, side by side.

Both are fresh processes training recipes/ci/tiny.yaml (a 2-layer LLaMA of width 32, 20
steps, world 1, gloo, ZeRO-1). The bare script (bench/bare_deepspeed.py) trains and exits;
`regimen run --json` does everything a run does (Ray, MLflow run, checkpoints, export,
logged model). Each round runs three arms: the bare script; `regimen run` in a new
directory (a fresh MLflow sqlite store); `regimen run` again there (an existing store).

The breakdown comes from the wall-clock marks Regimen records itself (driver and rank 0,
``startup`` in the `--json` line, also the run's ``startup/*`` MLflow metrics; see
orchestrator/timeline.py), plus the process exit this script sees (Ray's shutdown).

    python bench/startup.py [--rounds 3] [--json] [--no-template]

``--no-template`` gives each fresh store an empty cache directory, so it pays MLflow's
migrations as on a machine's first run (otherwise a new store copies the migrated
template in ``$REGIMEN_CACHE_DIR`` or ~/.cache/regimen, made by the first run ever).
Figures are medians over rounds; the ratio is regimen's wall time over the bare script's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.timeline import PHASES, phase_seconds

RECIPE = REPO / "recipes/ci/tiny.yaml"
EXIT = "exit (Ray shutdown)"


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_bare(workdir: Path) -> dict[str, float]:
    """The bare script as a fresh process: wall time and time to the end of its first step."""
    out = workdir / "bare.json"
    started = time.time()
    subprocess.run(
        [sys.executable, str(REPO / "bench/bare_deepspeed.py"), str(RECIPE), str(out)],
        cwd=workdir, env=_env(), check=True, capture_output=True,
    )  # fmt: skip
    ended = time.time()
    got = json.loads(out.read_text())
    return {"wall": ended - started, "first_step": got["first_step"] - started}


def run_regimen(workdir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`regimen run tiny.yaml --json` as a fresh process in ``workdir``: wall time, the
    time to the first step, each phase's length and the marks on one axis (0 = launch)."""
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(RECIPE), "--json"],
        cwd=workdir, env=_env(env), capture_output=True, text=True, check=False,
    )  # fmt: skip
    ended = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"regimen run failed:\n{proc.stderr[-3000:]}")
    marks = json.loads(proc.stdout.strip().splitlines()[-1])["startup"]
    phases = phase_seconds(marks)
    phases[EXIT] = round(ended - marks["run.ended"], 3)
    return {
        "wall": ended - started,
        "first_step": marks["worker.first_step"] - started,
        "phases": phases,
        "marks": {k: round(v - started, 3) for k, v in marks.items()},
    }


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _phase_median(rows: list[dict[str, Any]], phase: str) -> float | None:
    values = [r["phases"][phase] for r in rows if phase in r["phases"]]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON object, no table")
    parser.add_argument(
        "--no-template", action="store_true", help="fresh stores pay MLflow's migrations"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="regimen-startup-"))
    arms: dict[str, list[dict[str, Any]]] = {"bare": [], "fresh": [], "existing": []}
    for i in range(args.rounds):  # the arms alternate, so drifting load hits all of them
        workdir = root / f"round-{i}"
        workdir.mkdir()
        fresh_env = {"REGIMEN_CACHE_DIR": str(workdir / "cache")} if args.no_template else None
        arms["bare"].append(run_bare(workdir))
        arms["fresh"].append(run_regimen(workdir, fresh_env))
        arms["existing"].append(run_regimen(workdir, fresh_env))
    bare_wall = _median(arms["bare"], "wall")
    labels = [label for label, _, _ in PHASES] + [EXIT]
    result = {
        "rounds": args.rounds,
        "load_average": os.getloadavg(),
        "no_template": args.no_template,
        "bare": {k: _median(arms["bare"], k) for k in ("wall", "first_step")},
        **{
            arm: {
                "wall": _median(arms[arm], "wall"),
                "first_step": _median(arms[arm], "first_step"),
                "ratio": _median(arms[arm], "wall") / bare_wall,
                "phases": {p: _phase_median(arms[arm], p) for p in labels},
            }
            for arm in ("fresh", "existing")
        },
        "runs": arms,
    }
    if args.json:
        print(json.dumps(result, default=str))
        return
    fresh, existing = result["fresh"], result["existing"]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    print(f"load average {' '.join(f'{x:.2f}' for x in result['load_average'])}")
    print("| | bare DeepSpeed | regimen, fresh store | regimen, existing store |")
    print("|---|---|---|---|")
    print(
        f"| wall (s) | {bare_wall:.2f} | {fresh['wall']:.2f} | {existing['wall']:.2f} |\n"
        f"| first step ends (s) | {result['bare']['first_step']:.2f} "
        f"| {fresh['first_step']:.2f} | {existing['first_step']:.2f} |\n"
        f"| vs bare (wall) | 1.00 | {fresh['ratio']:.2f} | {existing['ratio']:.2f} |"
    )
    print("\n| phase (s, median) | fresh store | existing store |\n|---|---|---|")
    for label in labels:
        print(f"| {label} | {cell(fresh['phases'][label])} | {cell(existing['phases'][label])} |")
    print(f"\nratio regimen/bare (existing store) = {existing['ratio']:.2f}  (target <= 1.5)")


if __name__ == "__main__":
    main()
