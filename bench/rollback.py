"""Spike recovery, checkpoint load, async vs sync checkpoint blocking, indicator cost.

Everything runs through Regimen's own ``Trainer`` in this process (or in ``--world 2``
ranks spawned with ``torch.multiprocessing``, gloo, DeepSpeed ZeRO-1 on CPU), on a small
LLaMA (``--hidden``, ``--layers``; vocab 256, seq 64). Four measurements, side by side:

1. **Recovery**: a loss spike injected at step ``--spike-at`` (fault injection, x100) with
   checkpoints every ``--every`` steps; the spike guard (patience 1, good_after 1) rolls back.
   ``resumed_s`` = from the rollback decision (``StepHook.after_decision``, right after
   the all-reduced verdict) to the start of the first step after the restore (training goes
   on), ``recovery_s`` = to the end of that step; ``load_s`` = the
   checkpoint load alone (``CheckpointStore.load_engine`` + rank state) inside that rollback;
   ``steps_lost`` = spike step - restored step. Targets: resumed_s <= 2 x load_s (see the note
   in docs/BENCHMARKS.md), steps lost <= every + patience + good_after.
2. **Checkpoint blocking**: the same run with ``checkpoint.async: false`` then ``true``,
   checkpoints every ``--every`` steps; the time each save holds the training thread (the whole
   save for sync; the host copy for async), median; target async <= 10 % of sync.
3. **Step time while an async write is in flight** vs steps without one (same run).
4. **Leading indicators**: median step time with ``indicators_every: 1`` vs off (same run
   length, alternating order), and the probe's own measured cost per step.

    python bench/rollback.py [--world 1] [--hidden 256] [--layers 4] [--steps 24] [--every 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("PYTHONWARNINGS", "ignore")


def _recipe(args: argparse.Namespace, root: Path, **sections: Any) -> Any:
    from orchestrator.errors import RecipeError
    from orchestrator.recipe.dotted import deep_merge
    from orchestrator.recipe.loader import load_recipe_data

    h = args.hidden
    base = {
        "name": "bench-rollback",
        "model": {
            "kind": "hf_config",
            "architecture": "llama",
            "config": {
                "vocab_size": 256,
                "hidden_size": h,
                "intermediate_size": int(h * 2.75),
                "num_hidden_layers": args.layers,
                "num_attention_heads": max(2, h // 64),
                "num_key_value_heads": max(2, h // 64),
                "max_position_embeddings": 128,
            },
        },
        "data": {"kind": "stdlib_bytes", "seq_len": 64, "max_bytes": 400_000},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"steps": args.steps, "micro_batch_size": 4},
        "checkpoint": {"every": args.every, "keep": 0, "storage": str(root), "at_end": False},
        "resources": {"workers": args.world, "threads_per_worker": 1},
        "deepspeed": {"zero_optimization": {"stage": 1}},
    }
    try:
        return load_recipe_data(deep_merge(base, sections), "<bench>")
    except RecipeError as e:
        raise SystemExit(str(e)) from None


def _trainer(recipe: Any, run_dir: Path, rank: int, world: int) -> Any:
    from orchestrator.engine.loop import Trainer, WorkerContext

    return Trainer(recipe, WorkerContext(run_dir=run_dir, rank=rank, world_size=world))


def _recovery(args: argparse.Namespace, root: Path, rank: int, world: int) -> dict[str, Any]:
    guard = {"window": 16, "min_history": 4, "patience": 1, "good_after": 1, "skip_batches": 2}
    guard["grad_norm_zscore"] = False
    faults = {"spike_at_step": args.spike_at, "spike_factor": 100.0}
    recipe = _recipe(args, root, stability=guard, techniques={"fault_injection": faults})
    trainer = _trainer(recipe, root / "recovery", rank, world)
    marks: dict[str, float] = {}
    load = trainer.store.load_engine
    from orchestrator.engine.loop import StepHook
    from orchestrator.techniques.base import Action

    class Timed(StepHook):
        after_restore = False

        def after_decision(self, trainer: Any, decision: Any) -> None:
            if decision.action == Action.ROLLBACK:
                marks["detected"] = time.perf_counter()  # the rollback starts now

        def before_step(self, trainer: Any) -> None:
            self.after_restore = "detected" in marks and "recovered" not in marks
            if self.after_restore and "resumed" not in marks:
                marks["resumed"] = time.perf_counter()  # the first step after recovery starts

        def after_step(self, trainer: Any, metrics: dict[str, float]) -> None:
            if self.after_restore and trainer.last_decision.action != Action.ROLLBACK:
                marks["recovered"] = time.perf_counter()

    def timed_load(*a: Any, **k: Any) -> Any:
        started = time.perf_counter()
        out = load(*a, **k)
        marks["load_s"] = marks.get("load_s", 0.0) + time.perf_counter() - started
        return out

    trainer.step_hooks.append(Timed())
    trainer.store.load_engine = timed_load
    summary = trainer.run()
    (event,) = [e for e in summary["events"] if e["kind"] == "rollback"]
    rank_state_s = event["restore_s"] - marks["load_s"]  # the rest of the in-place restore
    return {
        "spike_step": args.spike_at,
        "detected_at_step": event["from_step"],
        "restored_step": event["to_step"],
        "steps_lost": event["from_step"] - event["to_step"],
        "bound": args.every + guard["patience"] + guard["good_after"],
        "load_s": marks["load_s"],
        "restore_s": event["restore_s"],
        "other_restore_s": rank_state_s,
        "resumed_s": marks["resumed"] - marks["detected"],
        "recovery_s": marks["recovered"] - marks["detected"],
    }


def _blocking(args: argparse.Namespace, root: Path, rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("sync", "async"):
        recipe = _recipe(
            args, root, checkpoint={"every": args.every, "async": mode == "async", "at_end": False}
        )
        trainer = _trainer(recipe, root / f"block-{mode}", rank, world)
        steps: list[tuple[float, bool]] = []
        from orchestrator.engine.loop import StepHook

        class Timed(StepHook):
            def __init__(self, steps: list) -> None:
                self.steps, self.started, self.busy = steps, 0.0, False

            def before_step(self, trainer: Any) -> None:
                pending = trainer.store.pending
                self.busy = pending is not None and pending.thread.is_alive()
                self.started = time.perf_counter()

            def after_step(self, trainer: Any, metrics: dict[str, float]) -> None:
                self.steps.append((time.perf_counter() - self.started, self.busy))

        trainer.step_hooks.append(Timed(steps))
        summary = trainer.run()
        blocked = [e["blocked_s"] for e in summary["events"] if e["kind"] == "checkpoint"]
        size = sum(f.stat().st_size for f in (root / f"block-{mode}").rglob("*.pt"))
        n_ckpt = len(blocked)
        out[mode] = {
            "blocked_median_s": statistics.median(blocked),
            "checkpoints": n_ckpt,
            "mb_per_checkpoint": size / max(1, n_ckpt) / 2**20,
            "step_median_s": statistics.median(t for t, _ in steps[2:]),
            "step_median_during_write_s": statistics.median([t for t, b in steps if b] or [0.0]),
            "steps_during_write": sum(1 for _, b in steps if b),
        }
    out["ratio_async_over_sync"] = (
        out["async"]["blocked_median_s"] / out["sync"]["blocked_median_s"]
    )
    return out


def _indicators(args: argparse.Namespace, root: Path, rank: int, world: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"off": [], "on": []}
    costs: list[float] = []
    for rnd, mode in enumerate(("off", "on", "on", "off")):
        stability = {"window": 16, "min_history": 4, "max_rollbacks": 0}
        if mode == "on":
            stability["indicators_every"] = 1
        recipe = _recipe(args, root, stability=stability, checkpoint={"every": 0, "at_end": False})
        trainer = _trainer(recipe, root / f"ind-{rnd}", rank, world)
        trainer._build()
        for technique in trainer.techniques:
            technique.on_train_start(trainer.state)
        for i in range(args.steps):
            started = time.perf_counter()
            metrics = trainer.run_step()
            if i >= 2:
                times[mode].append(time.perf_counter() - started)
                if mode == "on":
                    costs.append(metrics["indicator/cost_s"])
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {
        "step_off_s": off,
        "step_on_s": on,
        "ratio_on_over_off": on / off,
        "probe_cost_s": statistics.median(costs),
        "probe_share_of_step": statistics.median(costs) / on,
    }


def _init(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _worker(rank: int, args: argparse.Namespace, root: str, port: int, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    _init(rank, args.world, port)
    base = Path(root)
    result = {
        "recovery": _recovery(args, base, rank, args.world),
        "blocking": _blocking(args, base, rank, args.world),
        "indicators": _indicators(args, base, rank, args.world),
    }
    if rank == 0:
        Path(out).write_text(json.dumps(result, indent=2))


def main() -> None:
    """Run the four measurements and print them with their ratios and targets."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--spike-at", type=int, default=14)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-rollback-"))
    out = root / "result.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        if args.world == 1:
            _worker(0, args, str(root), port, str(out))
        else:
            import torch.multiprocessing as mp

            mp.spawn(_worker, args=(args, str(root), port, str(out)), nprocs=args.world)
        res = json.loads(out.read_text())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rec, blk, ind = res["recovery"], res["blocking"], res["indicators"]
    print(json.dumps(res, indent=2))
    print(
        f"\ndetection -> first step after recovery starts {rec['resumed_s'] * 1e3:.0f} ms vs "
        f"checkpoint load {rec['load_s'] * 1e3:.0f} ms: ratio "
        f"{rec['resumed_s'] / rec['load_s']:.2f} (target <= 2)"
    )
    print(
        f"detection -> that step done {rec['recovery_s'] * 1e3:.0f} ms: ratio "
        f"{rec['recovery_s'] / rec['load_s']:.2f} (includes one training step)"
    )
    print(
        f"  of which the in-place restore {rec['restore_s'] * 1e3:.0f} ms "
        f"({rec['restore_s'] / rec['load_s']:.2f} x load) and the first step after it "
        f"{(rec['recovery_s'] - rec['restore_s']) * 1e3:.0f} ms"
    )
    print(f"steps lost {rec['steps_lost']} (bound every + patience + good_after = {rec['bound']})")
    print(
        f"checkpoint blocking: sync {blk['sync']['blocked_median_s'] * 1e3:.1f} ms, async "
        f"{blk['async']['blocked_median_s'] * 1e3:.1f} ms: ratio "
        f"{blk['ratio_async_over_sync']:.3f} (target <= 0.10); "
        f"{blk['sync']['mb_per_checkpoint']:.1f} MB per checkpoint"
    )
    print(
        f"step time with a write in flight {blk['async']['step_median_during_write_s'] * 1e3:.0f}"
        f" ms vs {blk['async']['step_median_s'] * 1e3:.0f} ms overall "
        f"({blk['async']['steps_during_write']} steps overlapped a write)"
    )
    print(
        f"indicators every step: step {ind['step_on_s'] * 1e3:.1f} ms vs "
        f"{ind['step_off_s'] * 1e3:.1f} ms off: ratio {ind['ratio_on_over_off']:.3f}; "
        f"probe cost {ind['probe_cost_s'] * 1e3:.2f} ms = "
        f"{ind['probe_share_of_step'] * 100:.1f} % of a step"
    )


if __name__ == "__main__":
    main()
