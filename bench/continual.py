"""Class-incremental digits: no replay vs experience replay at two buffer sizes, side by side.

Continual evaluation (De Lange et al., ICLR 2023) evaluates every task seen so far every
few iterations instead of only at task switches; it reveals the *stability gap*: with
replay, accuracy on old tasks drops sharply right after a switch and then recovers, a
drop that evaluation at task ends never sees. This bench checks that at toy scale,
through Regimen's own Trainer (one process, one gloo rank, DeepSpeed ZeRO-0 on CPU):

* data: scikit-learn's 8x8 digits (`data.kind: digits`, eval split 30 %), split into 5
  tasks of two classes (0-1, 2-3, 4-5, 6-7, 8-9): `recipes/continual_digits.yaml`;
* model: the builtin MLP (hidden 128, 2 layers), AdamW 3e-3, batch 16, 60 steps a task;
* modes: no replay; class-balanced replay with 8 of 16 samples per batch from a buffer
  of 50 and of 200 sample indices; the same seeds, init and data order per seed;
* continual evaluation every ``--eval-every`` steps on 50 fixed eval images per seen
  task; final average accuracy, BWT, average min-ACC, WC-ACC and WF^10 from
  ``orchestrator.techniques.continual.metrics``, plus the min-ACC that evaluation only at task
  ends would report (same run, table restricted to the task ends).

    python bench/continual.py [--seeds 3] [--steps-per-task 60] [--eval-every 2]

Writes bench/out/continual.md and bench/out/continual.png (copied to docs/img/).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from orchestrator.engine.loop import Trainer, WorkerContext
from orchestrator.recipe import load_recipe
from orchestrator.techniques.continual.metrics import average_min_acc, summarize
from orchestrator.techniques.continual.technique import Continual

MODES: dict[str, dict[str, Any]] = {
    "no replay": {"size": 0, "ratio": 0.0},
    "replay 50": {"size": 50, "ratio": 0.5},
    "replay 200": {"size": 200, "ratio": 0.5},
}
COLUMNS = ("final_avg_acc", "bwt", "avg_min_acc", "wc_acc", "wf10", "min_acc_task_ends")


def _init_dist() -> None:
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)


def run_one(mode: str, seed: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Train one mode/seed through the Trainer; its metrics and per-task accuracy table."""
    replay = MODES[mode]
    n = args.steps_per_task
    overrides = [
        f"seed={seed}",
        "resources.workers=1",
        f"schedule.steps={5 * n}",
        f"continual.replay.size={replay['size']}",
        f"continual.replay.ratio={replay['ratio']}",
        f"continual.eval.every={args.eval_every}",
        "checkpoint.every=0",
        "checkpoint.at_end=false",
        f"checkpoint.storage={tmp}",
    ]
    stages = [
        {"name": f"digits{2 * i}{2 * i + 1}", "steps": n, "classes": [2 * i, 2 * i + 1]}
        for i in range(5)
    ]
    overrides.append("continual.stages=" + str(stages).replace("'", '"'))
    recipe = load_recipe(REPO / "recipes" / "continual_digits.yaml", overrides).recipe
    started = time.perf_counter()
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp / f"{mode}-{seed}".replace(" ", "_")))
    trainer.run()
    cl = next(t for t in trainer.techniques if isinstance(t, Continual))
    out: dict[str, Any] = dict(cl.final)
    ends = cl.ends
    at_ends = {t: {s: v for s, v in series.items() if s in ends} for t, series in cl.table.items()}
    out["min_acc_task_ends"] = average_min_acc(at_ends, ends, ends[-1])
    out["table"] = cl.table
    out["ends"] = ends
    out["seconds"] = time.perf_counter() - started
    assert out == {**out, **summarize(cl.table, ends, ends[-1])}  # the summary is the metrics
    return out


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Per-task accuracy over iterations, one panel per mode (seed of the first run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), sharey=True)
    for ax, (mode, runs) in zip(axes, results.items(), strict=True):
        first = runs[0]
        for task, series in sorted(first["table"].items()):
            steps = sorted(series)
            ax.plot(steps, [series[s] for s in steps], label=f"task {task}", lw=1.3)
        for end in first["ends"][:-1]:
            ax.axvline(end, color="grey", ls=":", lw=0.8)
        ax.set_title(f"{mode}: avg min-ACC {first['avg_min_acc']:.2f}")
        ax.set_xlabel("iteration")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("accuracy (continual eval)")
    axes[-1].legend(loc="lower left", fontsize=8)
    fig.suptitle("Class-incremental digits (5 x 2 classes), builtin MLP", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    """Run every mode for every seed; print and write the side-by-side table and the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps-per-task", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=2)
    args = parser.parse_args()
    _init_dist()
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for mode in MODES:
                res = run_one(mode, seed, args, Path(tmp))
                results[mode].append(res)
                print(f"seed {seed} {mode:>10}: " + ", ".join(
                    f"{c} {res[c]:.3f}" for c in COLUMNS if res.get(c) is not None
                ) + f" ({res['seconds']:.1f} s)", flush=True)  # fmt: skip
    header = "| mode | " + " | ".join(COLUMNS) + " | s/run |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for mode, runs in results.items():
        cells = [_fmt([r[c] for r in runs if r.get(c) is not None]) for c in COLUMNS]
        secs = statistics.mean(r["seconds"] for r in runs)
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {secs:.1f} |")
    base = results["no replay"]
    for mode in list(MODES)[1:]:
        gain = [
            r["final_avg_acc"] - b["final_avg_acc"]
            for r, b in zip(results[mode], base, strict=True)
        ]
        gap = [r["min_acc_task_ends"] - r["avg_min_acc"] for r in results[mode]]
        lines.append(
            f"\n{mode} vs no replay: final avg accuracy {_fmt(gain)} (difference); "
            f"stability gap (task-end min-ACC - continual min-ACC) {_fmt(gap)}"
        )
    text = "\n".join(lines)
    print("\n" + text)
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    cmd = f"python bench/continual.py --seeds {args.seeds} --steps-per-task "
    cmd += f"{args.steps_per_task} --eval-every {args.eval_every}"
    (out / "continual.md").write_text(f"`{cmd}`\n\n{text}\n")
    plot(results, out / "continual.png")
    (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "continual.png", REPO / "docs" / "img" / "continual.png")
    print(f"wrote {out / 'continual.md'}, {out / 'continual.png'}, docs/img/continual.png")


if __name__ == "__main__":
    main()
