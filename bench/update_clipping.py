"""Update clipping's effect on loss spikes, with and without, on setups that spike.

Every run is Regimen's own ``Trainer`` in this process (world 1, gloo, ZeRO-1 on CPU) on the
spike guard bench's quickstart-like LLaMA (``bench/spike_guard.py``: hidden 64, 2 layers,
byte vocabulary 256, seq 64, 8 samples a step), no spike guard, with and without
``techniques.update_clipping`` (max_rms 1), same seeds side by side. Setups:

* ``new_tokens``: the mechanism Wortsman et al. (2023) trace spikes to, a second moment far
  below g^2. Two continual stages: Python source (ASCII bytes) for ``--switch`` steps, then
  Greek and Cyrillic text (UTF-8 bytes 0xCE-0xD1, 0x80-0xBF: embedding rows that never had a
  gradient, so AdamW's v is 0 there and the first update of those rows is sqrt(1/(1-beta2))
  = 32x a settled one at beta2 0.999). AdamW 3e-3 constant after a 10-step warmup, beta2
  0.999, eps 1e-8, grad clip 1.
* ``high_lr``: AdamW 3e-2 (10x), beta2 0.999, warmup 1 step, no grad clip, the quickstart
  data: natural spikes, if any.
* ``lisa_fresh_moments``: the bench's own schedule (3e-3 peak, warmup 30, cosine) with LISA
  switching one of two layers every 5 steps and no re-warmup (``rewarm_steps: 0``): the one
  setup where this model spiked (the switched-in layer's first AdamW update is lr x sign(g)).

A *spike* is a step whose loss exceeds 1.3x the median of the 10 steps before it (a bump:
1.1x); on ``new_tokens`` the switch step itself (the new data's first loss, higher by design)
is not counted, only the steps after it. Also reported: the peak of the loss in the 20 steps
after the switch over the loss at the switch, the loss at the end, and the fraction of tensors
clipped per step.

    python bench/update_clipping.py                 # 3 seeds (about 2 min here)
    python bench/update_clipping.py --seeds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spike_guard import _init_world, _run

GREEK = [chr(c) for c in range(0x3B1, 0x3CA)]
CYRILLIC = [chr(c) for c in range(0x430, 0x450)]


def _foreign_text(path: Path, n_words: int = 40_000) -> Path:
    """Words of Greek and Cyrillic letters (2-byte UTF-8 sequences this model never saw)."""
    rng = random.Random(0)
    words = []
    for _ in range(n_words):
        alphabet = GREEK if rng.random() < 0.5 else CYRILLIC
        words.append("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8))))
    path.write_text(" ".join(words), encoding="utf-8")
    return path


def _setups(root: Path, switch: int, steps: int) -> dict[str, tuple[dict[str, Any], int]]:
    """Setup -> (recipe sections, the step where the new data starts, or -1)."""
    foreign = _foreign_text(root / "foreign.txt")
    new_tokens = {
        "optimizer": {"lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8, "grad_clip": 1.0},
        "stability": None,
        "techniques": {"warmup": {"schedule": "constant", "warmup_steps": 10}},
        "continual": {
            "stages": [
                {"name": "python", "steps": switch},
                {
                    "name": "foreign",
                    "steps": steps - switch,
                    "data": {"kind": "text_files", "paths": [str(foreign)], "seq_len": 64},
                },
            ],
            "eval": {"every": 0, "subset_size": 8},
        },
    }
    high_lr = {
        "optimizer": {"lr": 3e-2, "betas": [0.9, 0.999], "grad_clip": 0.0},
        "stability": None,
        "techniques": {"warmup": {"warmup_steps": 1, "min_lr": 3e-3}},
    }
    lisa_fresh = {
        "stability": None,
        "techniques": {"lisa": {"gamma": 1, "interval": 5, "rewarm_steps": 0}},
    }
    return {
        "new_tokens": (new_tokens, switch),
        "high_lr": (high_lr, -1),
        "lisa_fresh_moments": (lisa_fresh, -1),
    }


def _spikes(losses: list[float], switch: int, ratio: float, lookback: int = 10) -> int:
    """Steps whose loss exceeds ``ratio`` x the median of the (up to) ``lookback`` before it;
    after a data switch the lookback starts at the switch (whose own loss is not counted)."""
    n = 0
    for i in range(1, len(losses)):
        lo = switch if 0 <= switch < i else 0
        prev = [v for v in losses[max(lo, i - lookback) : i] if v == v]
        if i == switch or len(prev) < min(3, lookback):
            continue
        if losses[i] > ratio * statistics.median(prev):
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--switch", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", action="append", default=None, help="a setup (repeatable)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    _init_world()
    root = Path(tempfile.mkdtemp(prefix="bench-update-clipping-"))
    started = time.perf_counter()
    report: dict[str, Any] = {"seeds": args.seeds, "steps": args.steps, "switch": args.switch}
    try:
        for setup, (sections, switch) in _setups(root, args.switch, args.steps).items():
            if args.only and setup not in args.only:
                continue
            for arm, extra in (("adamw", {}), ("adamw+update_clipping", {"max_rms": 1.0})):
                data = json.loads(json.dumps(sections))
                if extra:
                    data["techniques"]["update_clipping"] = extra
                rows = []
                for seed in range(args.seeds):
                    r = _run(root, f"{setup}-{arm}", seed, args.steps, data)
                    losses = r.losses
                    peak = None
                    if switch >= 0:
                        peak = max(losses[switch + 1 : switch + 21]) / losses[switch]
                    rows.append(
                        {
                            "spikes": _spikes(losses, switch, 1.3),
                            "bumps": _spikes(losses, switch, 1.1),
                            "peak_after_switch": peak,
                            "final_loss": statistics.mean(losses[-10:]),
                            "clipped": statistics.mean(r.clipped) if r.clipped else None,
                            "failed": r.failed,
                        }
                    )
                report[f"{setup}/{arm}"] = rows
                print(f"  {setup} {arm}: {rows}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def _print(report: dict[str, Any]) -> None:
    print(
        f"\nupdate clipping, {report['seeds']} seeds x {report['steps']} steps, "
        f"{report['wall_s']} s"
    )
    print(
        "\n| setup | arm | spikes (> 1.3x) per seed | bumps (> 1.1x) per seed | "
        "peak after the switch / loss at it | final loss | tensors clipped / step |"
    )
    print("|---|---|---|---|---|---|---|")
    for key, rows in report.items():
        if "/" not in key:
            continue
        setup, arm = key.split("/")
        peaks = [r["peak_after_switch"] for r in rows if r["peak_after_switch"] is not None]
        clipped = [r["clipped"] for r in rows if r["clipped"] is not None]
        print(
            f"| {setup} | {arm} | {' '.join(str(r['spikes']) for r in rows)} | "
            f"{' '.join(str(r['bumps']) for r in rows)} | "
            f"{' '.join(f'x{p:.2f}' for p in peaks) or '-'} | "
            f"{statistics.mean(r['final_loss'] for r in rows):.3f} | "
            f"{f'{statistics.mean(clipped):.2f}' if clipped else '-'} |"
        )


if __name__ == "__main__":
    main()
