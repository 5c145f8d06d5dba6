"""Latency of `regimen submit --wait` to a running cluster, phase by phase, against
`regimen run` (embedded Ray) and a bare `ray job submit -- python -c pass` (the floor).

The cluster is a local `ray start --head` plus a second node (tests/ray_cluster.py: token
authentication on, 2 CPUs each), started once; every job goes to it while it is warm.
Each round runs, side by side: `regimen run` of the tiny recipe (recipes/ci/tiny.yaml,
or tests/integration/data/tiny.yaml), `regimen submit --wait` of the same recipe, and
the bare Ray job. The first submission is reported apart (cold: the cluster's first job).

Every milestone is a timestamp some part of the system recorded, in seconds from the
moment the command was started:

* the cluster's dashboard log: the client's first request (the CLI started, imported,
  staged the recipe), the package upload, the end of the log tail;
* Ray's job record: accepted (``start_time``) and ended (``end_time``);
* the job supervisor's log: the entrypoint process starts; the job's own log: its
  ``ray.init`` connected to the cluster (when Ray prints that line);
* MLflow: the run opened (``start_time``), its first training metric, the run ended;
* the command returning (``--wait`` noticed the end).

Cells are the median over the rounds (seconds from the start), with the median length of
the phase that ends there in brackets. Writes bench/out/submit.md. Also times
`regimen plan` on a 1,000-variant sweep.

    python bench/submit.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "integration")]

from ray_cluster import Cluster, ray_cluster  # noqa: I001  (after the sys.path line above)
from test_cluster import _tiny_recipe

CLI = [sys.executable, "-m", "orchestrator.cli"]
# (key, label) in the order they happen; a path shows the ones it has
MILESTONES = [
    ("request", "CLI started, imported, staged the recipe: first request to the cluster"),
    ("uploaded", "working_dir packaged and uploaded"),
    ("accepted", "job accepted (Ray job start_time)"),
    ("entrypoint", "job supervisor up, runtime env set: entrypoint process starts"),
    ("connected", "entrypoint imported and connected (its ray.init)"),
    ("run_open", "MLflow run open"),
    ("first_step", "first training step (first MLflow metric)"),
    ("run_end", "MLflow run ended"),
    ("job_end", "job ended (Ray job end_time)"),
    ("tail_end", "the job's log tail closed"),
    ("returned", "the command returned (`--wait` noticed the end)"),
]
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def _recipe(work: Path, name: str, **extra: object) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    r = _tiny_recipe()
    r.update(name=name, **extra)
    r["tracking"] = {"uri": f"sqlite:///{work}/mlflow.db", "experiment": name}
    r["checkpoint"] = {**r.get("checkpoint", {}), "storage": str(work / "runs")}
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _log_times(path: Path, pattern: str, after: float) -> list[float]:
    """Timestamps (epoch s) of the lines of a Ray log matching ``pattern``, at/after ``after``."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text(errors="replace").splitlines():
        m = _STAMP.match(line)
        if m and re.search(pattern, line):
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if t >= after - 0.01:
                found.append(t)
    return found


def _first(times: list[float]) -> float | None:
    return min(times) if times else None


def _mlflow(uri: str, run_id: str) -> dict[str, float | None]:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    run = c.get_run(run_id)
    stamps = [
        m.timestamp
        for k in run.data.metrics
        if k not in ("steps", "final_loss")
        for m in c.get_metric_history(run_id, k)
    ]
    return {
        "run_open": run.info.start_time / 1000.0,
        "first_step": min(stamps) / 1000.0 if stamps else None,
        "run_end": run.info.end_time / 1000.0 if run.info.end_time else None,
    }


def _spawn(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    t0 = time.time()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    t1 = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return t0, t1, proc.stdout


def _job_side(cluster: Cluster, job_id: str, t0: float) -> dict[str, float | None]:
    """The milestones the cluster recorded for one job (its logs and its job record)."""
    from orchestrator.cluster import jobs

    logs = cluster.temp_dir / "session_latest" / "logs"
    details = jobs.info(cluster.url, job_id)
    dash = logs / "dashboard.log"
    return {
        "request": _first(_log_times(dash, r"'GET /api/version ", t0)),
        "uploaded": _first(_log_times(dash, r"'PUT /api/packages/", t0)),
        "accepted": details.start_time / 1000.0,
        "entrypoint": _first(
            _log_times(logs / "jobs" / f"supervisor-{job_id}.log", "Submitting job with", t0)
        ),
        "connected": _first(
            _log_times(logs / f"job-driver-{job_id}.log", "Connected to Ray cluster", t0)
        ),
        "job_end": details.end_time / 1000.0 if details.end_time else None,
        "tail_end": _first(
            _log_times(
                logs / "dashboard_JobHead.log",
                f"WebSocket to job agent closed for job {re.escape(job_id)}",
                t0,
            )
        ),
    }


def _relative(stamps: dict[str, float | None], t0: float) -> dict[str, float]:
    return {k: v - t0 for k, v in stamps.items() if v is not None}


def run_embedded(work: Path, env: dict[str, str]) -> dict[str, float]:
    """`regimen run --json` with its own embedded Ray."""
    t0, t1, out = _spawn([*CLI, "run", str(_recipe(work, "bench-run")), "--json"], work, env)
    run_id = json.loads(out.strip().splitlines()[-1])["run_id"]
    stamps = {**_mlflow(f"sqlite:///{work}/mlflow.db", run_id), "returned": t1}
    return _relative(stamps, t0)


def submit_wait(cluster: Cluster, work: Path) -> dict[str, float]:
    """`regimen submit --wait --json` to the running cluster."""
    rec = _recipe(work, "bench-submit")
    t0, t1, out = _spawn(
        [*CLI, "submit", str(rec), "--address", cluster.url, "--wait", "--json"],
        work,
        cluster.env,
    )
    done = json.loads(out.strip().splitlines()[-1])
    run_id = next(r["run_id"] for r in done["runs"] if r["role"] != "sweep")
    stamps = {
        **_job_side(cluster, done["job_id"], t0),
        **_mlflow(f"sqlite:///{work}/mlflow.db", run_id),
        "returned": t1,
    }
    return _relative(stamps, t0)


def bare_job(cluster: Cluster, work: Path, n: int) -> dict[str, float]:
    """`ray job submit -- python -c pass` (waits for the end and tails the log by default)."""
    import shutil

    job_id = f"bench-bare-{n}-{secrets.token_hex(3)}"
    work.mkdir(parents=True, exist_ok=True)
    ray = shutil.which("ray") or "ray"
    args = [ray, "job", "submit", "--address", cluster.url, "--submission-id", job_id]
    t0, t1, _ = _spawn([*args, "--", "python", "-c", "pass"], work, cluster.env)
    return _relative({**_job_side(cluster, job_id, t0), "returned": t1}, t0)


def _load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _cell(rounds: list[dict[str, float]], key: str, prev: str | None) -> str:
    have = [r for r in rounds if key in r]
    if not have:
        return "-"
    at = statistics.median(r[key] for r in have)
    if prev is None:
        return f"{at:.1f}"
    steps = [r[key] - r[prev] for r in have if prev in r]
    return f"{at:.1f} (+{statistics.median(steps):.1f})" if steps else f"{at:.1f}"


def table(columns: list[tuple[str, list[dict[str, float]]]]) -> list[str]:
    """The milestone table: one column per path; a phase's length is measured from the
    path's previous milestone that it recorded."""
    lines = [
        "| milestone (s from the command's start) | " + " | ".join(c for c, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for key, label in MILESTONES:
        cells = []
        for _, rounds in columns:
            before = [k for k, _ in MILESTONES[: [m for m, _ in MILESTONES].index(key)]]
            seen = [k for k in before if any(k in r for r in rounds)]
            cells.append(_cell(rounds, key, seen[-1] if seen else None))
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plan_timing(root: Path, env: dict[str, str]) -> tuple[float, float]:
    """`regimen plan` on a 1,000-variant sweep: the CLI process, and in process."""
    grid = {
        "optimizer.lr": [1e-3 * (i + 1) for i in range(10)],
        "seed": list(range(10)),
        "optimizer.weight_decay": [0.01 * i for i in range(10)],
    }
    rec = _recipe(root / "plan", "bench-plan", sweep={"grid": grid})
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*CLI, "plan", str(rec), "--json"], capture_output=True, text=True, env=env, timeout=300
    )
    cli_s = time.perf_counter() - t0
    n = len(json.loads(proc.stdout)["variants"])
    from orchestrator.recipe.expand import expand
    from orchestrator.recipe.loader import load_recipe
    from orchestrator.recipe.plan import plan_of

    t0 = time.perf_counter()
    plans = [plan_of(v) for v in expand(load_recipe(rec))]
    inproc_s = time.perf_counter() - t0
    if not len(plans) == n == 1000:
        raise SystemExit(f"plan gave {n} variants, expected 1000")
    return cli_s, inproc_s


def main() -> None:
    """Run the rounds and write bench/out/submit.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(os.environ.get("BENCH_DIR", f"/tmp/regimen-bench-{secrets.token_hex(3)}"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO))
    loads = [_load()]
    runs: list[dict[str, float]] = []
    submits: list[dict[str, float]] = []
    bares: list[dict[str, float]] = []
    with ray_cluster(root / "cluster", second_node=True) as cluster:
        os.environ["RAY_AUTH_TOKEN"] = cluster.token  # this process reads the job records
        cold = submit_wait(cluster, root / "submit")
        print("cold submit", json.dumps({k: round(v, 2) for k, v in cold.items()}), flush=True)
        for n in range(args.rounds):
            for label, rows, measure in (
                ("run", runs, lambda: run_embedded(root / "run", env)),
                ("submit", submits, lambda: submit_wait(cluster, root / "submit")),
                ("bare", bares, lambda n=n: bare_job(cluster, root / "bare", n)),
            ):
                rows.append(measure())
                print(label, n, json.dumps({k: round(v, 2) for k, v in rows[-1].items()}))
            loads.append(_load())
            print(loads[-1], flush=True)
    cli_s, inproc_s = plan_timing(root, env)
    ratio = statistics.median(r["returned"] for r in submits) / statistics.median(
        r["returned"] for r in runs
    )
    floor = statistics.median(r["returned"] for r in bares)
    lines = [
        "# regimen submit --wait, phase by phase, vs regimen run and a bare Ray job",
        "",
        f"Machine: {os.cpu_count()} cores, no GPU; measured {time.strftime('%Y-%m-%d %H:%M')}, "
        f"one session, {args.rounds} rounds (medians); {'; '.join(loads)} (start, each round).",
        "Cluster: `ray start --head` + a second node, 2 CPUs each, token auth; tiny recipe.",
        "",
        *table(
            [
                ("`regimen run` (embedded Ray)", runs),
                ("`regimen submit --wait` (cold: first job)", [cold]),
                ("`regimen submit --wait` (warm)", submits),
                ("bare `ray job submit -- python -c pass`", bares),
            ]
        ),
        "",
        f"`regimen submit --wait` / `regimen run`, to the end: **{ratio:.2f}x**; "
        f"the bare Ray job's floor: {floor:.1f} s.",
        "",
        "| `regimen plan` on a 1,000-variant sweep | seconds |",
        "|---|---:|",
        f"| CLI process (`regimen plan --json`, incl. Python + imports) | {cli_s:.2f} |",
        f"| load + expand + plan, in process | {inproc_s:.2f} |",
        "",
        f"Command: `python bench/submit.py --rounds {args.rounds}`",
    ]
    out_md = REPO / "bench" / "out" / "submit.md"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
