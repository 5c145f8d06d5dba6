"""Steady-state step time of `regimen run` against a bare DeepSpeed script, side by side.

Both train the same tiny LLaMA on the same byte data with 2 CPU workers (gloo,
ZeRO-1, fp32), micro-batch 8, seq 128. The bare script is the minimal loop a
person would write (forward, backward, step, loss.item()); Regimen runs its full
loop (techniques, all-reduced verdicts, async MLflow metrics, checkpoints off
the measured window) on its worker group (the default launcher). The median step time over steps
[warm, steps) is compared.

    python bench/overhead.py [--steps 120] [--warm 20] [--rounds 3]
                             [--system-metrics SECONDS] [--arms bare,loop,regimen,system]

Each round runs the arms one after the other; the figure per arm is the
median over rounds of its median step time. The `regimen` arm runs with MLflow's system
metrics off (`tracking.system_metrics=false`); `--system-metrics S` adds the `system` arm,
`regimen run` with every worker sampling its machine every S seconds, and prints its ratio
to the `regimen` arm: the per-step cost of system metrics.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bare_worker(rank: int, world: int, port: int, recipe_path: str, out: str) -> None:
    """The bare DeepSpeed loop on one rank (no Ray, no Regimen loop)."""
    from bench.bare_deepspeed import bare_train

    times = bare_train(recipe_path, rank, world, port)["step_times"]
    if rank == 0:
        Path(out).write_text(json.dumps(times))


def loop_worker(rank: int, world: int, port: int, recipe_path: str, out: str) -> None:
    """Regimen's own training loop on one rank, without Ray and without MLflow: the share
    of the overhead that is the loop's (hooks, all-reduced loss and verdicts)."""
    from bench.bare_deepspeed import rank_env

    rank_env(rank, world, port)
    import torch.distributed as dist

    from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
    from orchestrator.recipe.loader import load_recipe

    dist.init_process_group("gloo", rank=rank, world_size=world)
    recipe = load_recipe(recipe_path).recipe
    times: list[float] = []

    class Timed(StepHook):
        def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            times.append(metrics["step_time_s"])

    ctx = WorkerContext(Path(out).parent / f"loop-{rank}", rank, world)
    Trainer(recipe, ctx, step_hooks=[Timed()]).run()
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def run_loop(recipe_path: Path, workdir: Path) -> list[float]:
    """Spawn 2 ranks of Regimen's loop (no Ray, no MLflow); rank 0's step times."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    out = workdir / "loop.json"
    mp.spawn(loop_worker, args=(2, free_port(), str(recipe_path), str(out)), nprocs=2, join=True)
    return json.loads(out.read_text())


def run_bare(recipe_path: Path, workdir: Path) -> list[float]:
    """Spawn 2 bare ranks; return rank 0's step times."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    out = workdir / "bare.json"
    mp.spawn(bare_worker, args=(2, free_port(), str(recipe_path), str(out)), nprocs=2, join=True)
    return json.loads(out.read_text())


def run_regimen(recipe_path: Path, workdir: Path, overrides: tuple[str, ...] = ()) -> list[float]:
    """`regimen run --json [KEY=VALUE ...]` in a subprocess; step times read back from MLflow."""
    import mlflow

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(recipe_path), "--json", *overrides],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"regimen run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    client = mlflow.MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    history = client.get_metric_history(summary["run_id"], "step_time_s")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warm", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the arms")
    parser.add_argument(
        "--system-metrics",
        type=float,
        default=None,
        metavar="SECONDS",
        help="add the arm `regimen run` with system metrics sampled every SECONDS",
    )
    parser.add_argument(
        "--arms",
        default="bare,loop,regimen,system",
        help="comma-separated arms to run (system only with --system-metrics)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for the `regimen run` arm only (e.g. schedule.log_every=10)",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="regimen-bench-"))
    recipe = yaml.safe_load((REPO / "recipes/quickstart.yaml").read_text())
    recipe["schedule"].update(steps=args.steps, eval_every=0)
    recipe["checkpoint"].update(every=0, at_end=False, storage=str(workdir / "runs"))
    recipe["techniques"]["warmup"]["warmup_steps"] = 5
    recipe["tracking"]["uri"] = f"sqlite:///{workdir}/mlflow.db"
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    off = (*args.override, "tracking.system_metrics=false")
    on = (
        *args.override,
        "tracking.system_metrics=true",
        f"tracking.system_metrics_interval_s={args.system_metrics}",
    )
    runners = {
        "bare": run_bare,
        "loop": run_loop,
        "regimen": functools.partial(run_regimen, overrides=off),
        "system": functools.partial(run_regimen, overrides=on),
    }
    chosen = [a for a in args.arms.split(",") if a != "system" or args.system_metrics]
    unknown = set(chosen) - set(runners)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}: choose from {sorted(runners)}")
    arms: dict[str, list[float]] = {name: [] for name in chosen}
    counts: dict[str, int] = {name: 0 for name in chosen}
    for _ in range(args.rounds):  # alternate the arms so drifting machine load hits them all
        for name in chosen:
            times = runners[name](path, workdir)[args.warm :]
            arms[name].append(statistics.median(times))
            counts[name] += len(times)
    med = {name: statistics.median(values) for name, values in arms.items()}
    base = med.get("bare")
    labels = {
        "bare": "bare DeepSpeed (2 ranks, gloo)",
        "loop": "Regimen loop, no Ray, no MLflow (2 ranks, gloo)",
        "regimen": f"regimen run (worker group, 2 workers, MLflow) {' '.join(args.override)}",
        "system": f"regimen run + system metrics every {args.system_metrics} s",
    }
    print(f"per-round medians (s): {arms}  load average: {os.getloadavg()}")
    print("| runner | median step (ms) | vs bare | steps measured |\n|---|---|---|---|")
    for name in chosen:
        ratio = f"{med[name] / base:.3f}" if base else "-"
        print(f"| {labels[name]} | {med[name] * 1e3:.1f} | {ratio} | {counts[name]} |")
    if base and "regimen" in med:
        print(f"\nratio regimen/bare = {med['regimen'] / base:.3f}  (target <= 1.05)")
    if "system" in med and "regimen" in med:
        print(
            f"ratio system metrics on/off = {med['system'] / med['regimen']:.3f}  "
            f"(per-step cost of sampling every {args.system_metrics} s)"
        )


if __name__ == "__main__":
    main()
