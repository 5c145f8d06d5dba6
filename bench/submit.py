"""Latency of `regimen submit` (Ray Jobs on a local 2-node cluster) against `regimen run`.

Both train the tiny recipe (tests/integration/data/tiny.yaml, or recipes/ci/tiny.yaml
when present) in the same session, side by side. Measured from the moment the
command starts: to the first training step (earliest MLflow metric timestamp of
the run) and to the end (the command returns; for submit, `--wait`). Also times
`regimen plan` on a 1,000-variant sweep (the CLI process, and load+expand+plan
in process). Writes bench/out/submit.md.

    python bench/submit.py
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "integration")]

from ray_cluster import ray_cluster  # noqa: I001  (after the sys.path line above)
from test_cluster import _tiny_recipe


def _recipe(work: Path, name: str, **extra: object) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    r = _tiny_recipe()
    r.update(name=name, **extra)
    r["tracking"] = {"uri": f"sqlite:///{work}/mlflow.db", "experiment": name}
    r["checkpoint"] = {**r.get("checkpoint", {}), "storage": str(work / "runs")}
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _first_step(uri: str, run_id: str) -> float:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    keys = list(c.get_run(run_id).data.metrics)
    stamps = [
        m.timestamp
        for k in keys
        if k not in ("steps", "final_loss")
        for m in c.get_metric_history(run_id, k)
    ]
    return min(stamps) / 1000.0


def _timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, dict]:
    t0 = time.time()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    t1 = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return t0, t1, json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    root = Path(os.environ.get("BENCH_DIR", f"/tmp/regimen-bench-{secrets.token_hex(3)}"))
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PYTHONPATH=str(REPO))
    cli = [sys.executable, "-m", "orchestrator.cli"]
    rows = []

    # regimen run (embedded local Ray)
    work = root / "run"
    t0, t1, out = _timed([*cli, "run", str(_recipe(work, "bench-run")), "--json"], work, env)
    rows.append(
        (
            "regimen run (embedded Ray)",
            _first_step(f"sqlite:///{work}/mlflow.db", out["run_id"]) - t0,
            t1 - t0,
        )
    )

    # regimen submit --wait (Ray Jobs, 2-node local cluster, token auth)
    with ray_cluster(root / "cluster", second_node=True) as cluster:
        work = root / "submit"
        for label in ("regimen submit --wait (cold: first job)", "regimen submit --wait (warm)"):
            rec = _recipe(work, "bench-submit")
            t0, t1, out = _timed(
                [*cli, "submit", str(rec), "--address", cluster.url, "--wait", "--json"],
                work,
                cluster.env,
            )
            run_id = next(r["run_id"] for r in out["runs"] if r["role"] != "sweep")
            rows.append((label, _first_step(f"sqlite:///{work}/mlflow.db", run_id) - t0, t1 - t0))

    # regimen plan on a 1,000-variant sweep
    grid = {
        "optimizer.lr": [1e-3 * (i + 1) for i in range(10)],
        "seed": list(range(10)),
        "optimizer.weight_decay": [0.01 * i for i in range(10)],
    }
    sweep = {"grid": grid}
    rec = _recipe(root / "plan", "bench-plan", sweep=sweep)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cli, "plan", str(rec), "--json"], capture_output=True, text=True, env=env, timeout=300
    )
    cli_s = time.perf_counter() - t0
    n = len(json.loads(proc.stdout)["variants"])
    from orchestrator.recipe.expand import expand
    from orchestrator.recipe.loader import load_recipe
    from orchestrator.recipe.plan import plan_of

    t0 = time.perf_counter()
    plans = [plan_of(v) for v in expand(load_recipe(rec))]
    inproc_s = time.perf_counter() - t0
    assert len(plans) == n == 1000, n

    lines = [
        "# regimen submit vs regimen run (tiny recipe), and regimen plan at 1,000 variants",
        "",
        f"Machine: {os.cpu_count()} cores, no GPU; measured {time.strftime('%Y-%m-%d %H:%M')}, "
        "one session.",
        "Times in seconds from the command's start.",
        "",
        "| path | to first training step (s) | to job end (s) |",
        "|---|---:|---:|",
        *[f"| {a} | {b:.1f} | {c:.1f} |" for a, b, c in rows],
        "",
        "| `regimen plan` on a 1,000-variant sweep | seconds |",
        "|---|---:|",
        f"| CLI process (`regimen plan --json`, incl. Python + imports) | {cli_s:.2f} |",
        f"| load + expand + plan, in process | {inproc_s:.2f} |",
        "",
        "Command: `python bench/submit.py`",
    ]
    out_md = REPO / "bench" / "out" / "submit.md"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
