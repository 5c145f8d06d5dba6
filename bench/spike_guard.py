"""The spike guard's confusion table: false alarms on clean runs, catches on faulty ones.

Every run goes through Regimen's own ``Trainer`` in this process (world 1, gloo, DeepSpeed
ZeRO-1 on CPU), on a quickstart-like LLaMA (hidden 64, 2 layers, vocab 256, seq 64, 8
samples a step; warmup 30 then cosine to 3e-4, peak 3e-3), with the recipe's ``stability:``
defaults (whatever the checked-out code's defaults are) and checkpoints every 50 steps.

* **Clean runs** (nothing is wrong, so any detection is false): ``quickstart``; ``lisa``
  (switching every 5 steps); ``sgg`` (reclustering every 20); ``continual`` (two stages,
  Python source then the repo's Markdown docs); ``warmup30`` (linear warmup ending at step
  30, then constant); ``early_dropout`` (rate 0.1, cut off at step 50); ``cosine_to_zero``.
* **Faulty runs** (``techniques.fault_injection``, fired at ``--fault-at``): loss spikes x1.5,
  x3, x10, x100 for one step and for three; a slow divergence (loss factor rising to 2 over 50
  steps); NaN gradients (the loss stays finite); a gradient blow-up x100 with no loss change;
  a corrupted batch (random tokens).

Reported: false skips and false rollbacks per 1,000 clean steps (every ``spike`` event is
a skipped update; ``rollback`` events are rollbacks); per fault kind, caught / runs, the
detection delay (first detection step - fault step) and the steps lost (updates skipped
plus steps redone after a rollback). Update clipping's effect: ``bench/update_clipping.py``.
Detections of a faulty run outside the fault's window are counted as false too.

    python bench/spike_guard.py            # clean: 5 seeds x 300 steps (10,500 steps),
                                           # faults: 3 seeds (about 12 min here)
    python bench/spike_guard.py --quick    # 1 seed, 120 steps (about 1.5 min)
    python bench/spike_guard.py --only clean --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

CLEAN: dict[str, dict[str, Any]] = {
    "quickstart": {},
    "lisa": {"techniques": {"lisa": {"gamma": 1, "interval": 5}}},
    "sgg": {"techniques": {"sgg": {"recluster_interval": 20, "scale_decay": 0.5}}},
    "continual": {"continual": "two_stages"},  # filled in by _clean_sections
    "warmup30": {"techniques": {"warmup": {"schedule": "constant", "warmup_steps": 30}}},
    "early_dropout": {
        "techniques": {
            "dropout": {"mode": "early", "schedule": "constant", "rate": 0.1, "cutoff_steps": 50}
        }
    },
    "cosine_to_zero": {
        "techniques": {"warmup": {"schedule": "cosine", "warmup_steps": 10, "min_lr": 0.0}}
    },
}


def _faults(at: int) -> dict[str, tuple[dict[str, Any], int]]:
    """Fault kind -> (fault_injection config, steps the fault lasts)."""
    out: dict[str, tuple[dict[str, Any], int]] = {}
    for factor in (1.5, 3.0, 10.0, 100.0):
        for steps in (1, 3):
            cfg = {"spike_at_step": at, "spike_factor": factor, "spike_steps": steps}
            out[f"spike_x{factor:g}_{steps}step"] = (cfg, steps)
    out["slow_divergence"] = (
        {"diverge_at_step": at, "diverge_steps": 50, "diverge_factor": 2.0},
        50,
    )
    out["nan_grad"] = ({"nan_grad_at_step": at}, 1)
    out["grad_blowup_x100"] = ({"grad_blowup_at_step": at, "grad_factor": 100.0}, 1)
    out["corrupt_batch"] = ({"corrupt_batch_at_step": at}, 1)
    return out


def _base(root: Path, steps: int, seed: int) -> dict[str, Any]:
    return {
        "name": "bench-spike-guard",
        "seed": seed,
        "model": {
            "kind": "hf_config",
            "architecture": "llama",
            "config": {
                "vocab_size": 256,
                "hidden_size": 64,
                "intermediate_size": 176,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "max_position_embeddings": 128,
                "tie_word_embeddings": False,
            },
        },
        "data": {"kind": "stdlib_bytes", "seq_len": 64, "max_bytes": 400_000},
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01, "grad_clip": 1.0},
        "schedule": {"steps": steps, "micro_batch_size": 8},
        "techniques": {"warmup": {"schedule": "cosine", "warmup_steps": 30, "min_lr": 3e-4}},
        "stability": {},
        "checkpoint": {"every": 50, "keep": 0, "storage": str(root), "at_end": False},
        "resources": {"workers": 1, "threads_per_worker": 1},
        "deepspeed": {"zero_optimization": {"stage": 1}},
    }


def _clean_sections(kind: str, steps: int) -> dict[str, Any]:
    sections = json.loads(json.dumps(CLEAN[kind]))
    if kind == "continual":
        docs = sorted(str(p) for p in (REPO / "docs").glob("*.md"))
        half = steps // 2
        sections["continual"] = {
            "stages": [
                {"name": "python", "steps": half},
                {
                    "name": "docs",
                    "steps": steps - half,
                    "data": {"kind": "text_files", "paths": docs, "seq_len": 64},
                },
            ],
            "eval": {"every": 0, "subset_size": 8},
        }
    return sections


def _recipe(root: Path, steps: int, seed: int, sections: dict[str, Any]) -> Any:
    from orchestrator.errors import RecipeError
    from orchestrator.recipe.dotted import deep_merge
    from orchestrator.recipe.loader import load_recipe_data

    data = deep_merge(_base(root, steps, seed), sections)
    if data.get("stability") is None:
        data.pop("stability", None)
    try:
        return load_recipe_data(data, "<bench>")
    except RecipeError as e:
        raise SystemExit(str(e)) from None


@dataclass
class Run:
    """What one run did: its detections (step, detector), rollbacks, losses."""

    kind: str
    seed: int
    steps: int
    detections: list[tuple[int, str]] = field(default_factory=list)
    rollbacks: list[tuple[int, int]] = field(default_factory=list)  # (from_step, to_step)
    rollback_requests: list[int] = field(default_factory=list)  # steps a rollback was decided
    losses: list[float] = field(default_factory=list)
    clipped: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    failed: str = ""


def _run(root: Path, kind: str, seed: int, steps: int, sections: dict[str, Any]) -> Run:
    import torch

    from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
    from orchestrator.techniques.base import Action

    run_dir = root / f"{kind}-{seed}"
    recipe = _recipe(root, steps, seed, sections)
    out = Run(kind, seed, steps)

    class Losses(StepHook):
        def after_decision(self, trainer: Any, decision: Any) -> None:
            if decision.action == Action.ROLLBACK:  # also one that finds no checkpoint
                out.rollback_requests.append(int(trainer.state.step))

        def after_step(self, trainer: Any, metrics: dict[str, float]) -> None:
            out.losses.append(float(metrics.get("loss", float("nan"))))
            if "update_clipping/clipped_fraction" in metrics:
                out.clipped.append(metrics["update_clipping/clipped_fraction"])

    torch.manual_seed(seed)
    started = time.perf_counter()
    trainer = Trainer(recipe, WorkerContext(run_dir=run_dir), step_hooks=[Losses()])
    try:
        trainer.run()
    except Exception as e:  # a stop (max_rollbacks) or a crash: what it did still counts
        out.failed = f"{type(e).__name__}: {str(e)[:120]}"
    out.wall_s = time.perf_counter() - started
    for e in trainer.events:
        if e["kind"] == "spike":
            out.detections.append((int(e.get("at_step", e["step"])), str(e.get("detector"))))
        elif e["kind"] == "rollback":
            out.rollbacks.append((int(e["from_step"]), int(e["to_step"])))
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def _init_world() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 120 steps a run")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of the clean runs")
    parser.add_argument("--fault-seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--fault-at", type=int, default=None)
    parser.add_argument("--only", choices=("clean", "faults"), action="append", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures")
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 5)
    fault_seeds = args.fault_seeds or (1 if args.quick else 3)
    steps = args.steps or (120 if args.quick else 300)
    fault_at = args.fault_at or (steps * 3) // 5
    parts = args.only or ["clean", "faults"]

    import torch

    torch.set_num_threads(1)
    _init_world()
    root = Path(tempfile.mkdtemp(prefix="bench-spike-guard-"))
    report: dict[str, Any] = {
        "seeds": seeds,
        "fault_seeds": fault_seeds,
        "steps": steps,
        "fault_at": fault_at,
    }
    started = time.perf_counter()
    try:
        if "clean" in parts:
            report["clean"] = _clean(root, seeds, steps)
        if "faults" in parts:
            report["faults"] = _faulty(root, fault_seeds, steps, fault_at)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def _clean(root: Path, seeds: int, steps: int) -> dict[str, Any]:
    rows = {}
    for kind in CLEAN:
        runs = [_run(root, kind, s, steps, _clean_sections(kind, steps)) for s in range(seeds)]
        total = sum(len(r.losses) for r in runs)  # steps run (a failed run stops early)
        skips = sum(len(r.detections) for r in runs)
        rollbacks = sum(len(r.rollback_requests) for r in runs)
        rows[kind] = {
            "steps": total,
            "false_skips": skips,
            "false_rollbacks": rollbacks,
            "skips_per_1k": 1000 * skips / max(total, 1),
            "rollbacks_per_1k": 1000 * rollbacks / max(total, 1),
            "detectors": sorted({d for r in runs for _, d in r.detections}),
            "detection_steps": sorted({a for r in runs for a, _ in r.detections})[:8],
            "failed": [r.failed for r in runs if r.failed],
            "wall_s": round(sum(r.wall_s for r in runs), 1),
        }
        print(f"  clean {kind}: {rows[kind]}", flush=True)
    total = sum(r["steps"] for r in rows.values())
    skips = sum(r["false_skips"] for r in rows.values())
    rollbacks = sum(r["false_rollbacks"] for r in rows.values())
    rows["all"] = {
        "steps": total,
        "false_skips": skips,
        "false_rollbacks": rollbacks,
        "skips_per_1k": 1000 * skips / max(total, 1),
        "rollbacks_per_1k": 1000 * rollbacks / max(total, 1),
    }
    return rows


def _faulty(root: Path, seeds: int, steps: int, at: int) -> dict[str, Any]:
    rows = {}
    for kind, (cfg, lasts) in _faults(at).items():
        # the fault's window: its steps plus the guard's patience (default 2) and a margin
        window = (at, at + lasts + 4)
        caught, delays, lost, detectors = 0, [], [], set()
        false_hits: list[tuple[int, str]] = []
        n_rollbacks, failed = 0, []
        for seed in range(seeds):
            r = _run(root, kind, seed, steps, {"techniques": {"fault_injection": cfg}})
            inside = [(a, d) for a, d in r.detections if window[0] <= a < window[1]]
            false_hits += [h for h in r.detections if h not in inside]
            if inside:
                caught += 1
                delays.append(min(a for a, _ in inside) - at)
                detectors |= {d for _, d in inside}
            redone = sum(f - t for f, t in r.rollbacks if f >= at)
            n_rollbacks += len(r.rollback_requests)
            failed += [r.failed] if r.failed else []
            lost.append(len(inside) + redone)
        rows[kind] = {
            "caught": caught,
            "runs": seeds,
            "delay_steps": statistics.median(delays) if delays else None,
            "steps_lost": statistics.median(lost),
            "detectors": sorted(detectors),
            "false_outside_window": len(false_hits),
            "false_at": false_hits[:6],
            "rollbacks": n_rollbacks,
            "failed": failed,
        }
        print(f"  fault {kind}: {rows[kind]}", flush=True)
    return rows


def _print(report: dict[str, Any]) -> None:
    print(
        f"\nspike guard confusion table (clean: {report['seeds']} seed(s), faults: "
        f"{report['fault_seeds']}, {report['steps']} steps a run, faults at step "
        f"{report['fault_at']}, {report['wall_s']} s)"
    )
    if "clean" in report:
        print(
            "\n| clean run | steps | false skips | false rollbacks | skips / 1k | rollbacks / 1k |"
        )
        print("|---|---|---|---|---|---|")
        for kind, r in report["clean"].items():
            print(
                f"| {kind} | {r['steps']} | {r['false_skips']} | {r['false_rollbacks']} | "
                f"{r['skips_per_1k']:.1f} | {r['rollbacks_per_1k']:.1f} |"
            )
    if "faults" in report:
        print(
            "\n| fault | caught | delay (steps) | steps lost | detector | rollbacks | "
            "false elsewhere |"
        )
        print("|---|---|---|---|---|---|---|")
        for kind, r in report["faults"].items():
            delay = "-" if r["delay_steps"] is None else f"{r['delay_steps']:g}"
            print(
                f"| {kind} | {r['caught']}/{r['runs']} | {delay} | {r['steps_lost']:g} | "
                f"{', '.join(r['detectors']) or '-'} | {r['rollbacks']} | "
                f"{r['false_outside_window']} {r['false_at'] or ''} |"
            )


if __name__ == "__main__":
    main()
