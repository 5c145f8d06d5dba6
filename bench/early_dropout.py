"""Early dropout vs no dropout vs standard dropout on underfitting models, side by side.

"Dropout Reduces Underfitting" (Liu et al., ICML 2023) reports that dropout used only
early in training (early dropout) ends with a *lower training loss* than no dropout on
underfitting models, while standard dropout ends higher. This checks that qualitative
claim at toy scale, in one process:

* data: scikit-learn's 8x8 digits (Regimen's ``data.kind: digits``; 1,438 train images);
* models: Regimen's builtin MLP (hidden 8, 2 layers, ~0.7 k parameters) and ViT (dim 32,
  2 blocks, ~19 k parameters), both too small to fit the train split in the budget
  (underfitting: their training loss stays well above 0);
* the same seeded init, batch order and AdamW + cosine LR for every mode of a seed; the
  rates come from Regimen's ``techniques.dropout`` (``DropoutSchedule``) every step:
  ``none`` (rate 0), ``standard`` (rate p throughout), ``early`` (rate p for the first
  ``cutoff`` fraction of steps, then 0; constant schedule as in the paper's ViT-T runs);
  the ViT schedules dropout and stochastic depth (``target: both``);
* the figure: final training loss = cross-entropy over the whole train split in eval
  mode (no dropout), as the paper measures it; plus eval accuracy.

    python bench/early_dropout.py [--seeds 5] [--vit-seeds 3] [--steps 600] [--rate 0.1]

Writes bench/out/early_dropout.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.data import build_digits
from orchestrator.engine.vision import build_builtin
from orchestrator.techniques.dropout import DropoutConfig, DropoutSchedule

SETTINGS = {
    "mlp": ("mlp", {"hidden": 8, "depth": 2, "dropout": 0.1}, "dropout"),
    "vit": ("vit", {"dim": 32, "depth": 2, "heads": 2, "dropout": 0.1, "drop_path": 0.1}, "both"),
}
MODES = ("none", "standard", "early")


def _schedule(mode: str, rate: float, cutoff: float, target: str) -> DropoutConfig:
    if mode == "none":
        return DropoutConfig(mode="standard", rate=0.0, target=target)
    if mode == "standard":
        return DropoutConfig(mode="standard", rate=rate, target=target)
    return DropoutConfig(mode="early", rate=rate, cutoff_fraction=cutoff, target=target)


def train_one(setting: str, mode: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    arch, cfg, target = SETTINGS[setting]
    split = build_digits(0.2)
    x, y = split.train.images, split.train.labels
    model = build_builtin(arch, {**cfg}, seed)  # built at the max rate; the schedule sets it
    tech = DropoutSchedule(_schedule(mode, args.rate, args.cutoff, target))
    tech.attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    perm, pos = torch.randperm(len(y), generator=order), 0
    losses = []
    model.train()
    for step in range(args.steps):
        tech.apply(step, args.steps)
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        if pos + args.batch > len(y):
            perm, pos = torch.randperm(len(y), generator=order), 0
        idx = perm[pos : pos + args.batch]
        pos += args.batch
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        train_loss = float(F.cross_entropy(model(x), y))
        logits = model(split.eval.images)
        acc = float((logits.argmax(-1) == split.eval.labels).float().mean())
    return {"train_loss": train_loss, "last_batch_loss": statistics.mean(losses[-20:]), "acc": acc}


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the MLP")
    parser.add_argument("--vit-seeds", type=int, default=3, help="seeds of the ViT (slower)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--cutoff", type=float, default=0.2)
    parser.add_argument("--settings", default="mlp,vit")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "early_dropout.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    settings = [s for s in args.settings.split(",") if s]
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for setting in settings:
        for seed in range(args.vit_seeds if setting == "vit" else args.seeds):
            for mode in MODES:  # interleaved: every mode of a seed runs under the same load
                results.setdefault((setting, mode), []).append(train_one(setting, mode, seed, args))
            print(f"{setting} seed {seed} done ({time.perf_counter() - started:.0f} s)", flush=True)
    lines = [
        "# Early dropout vs none vs standard (underfitting, 8x8 digits)",
        "",
        f"Command: `python bench/early_dropout.py --seeds {args.seeds} --vit-seeds "
        f"{args.vit_seeds} --steps {args.steps} --rate {args.rate} --cutoff {args.cutoff}`  ",
        f"{args.steps} AdamW steps (lr {args.lr}, cosine), batch {args.batch}, dropout rate "
        f"{args.rate}, early cut-off {args.cutoff:.0%} of steps (constant), {args.seeds} seeds "
        f"(MLP) / {args.vit_seeds} (ViT; dropout + stochastic depth) "
        "(same init and batch order for every mode of a seed). Final training loss = "
        "cross-entropy over the whole train split in eval mode. Mean ± std over seeds.",
        "",
        "| model | mode | final train loss | last-20-batch loss | eval accuracy |",
        "|---|---|---|---|---|",
    ]
    verdicts = []
    for setting in settings:
        for mode in MODES:
            rows = results[(setting, mode)]
            lines.append(
                f"| {setting} | {mode} | {_ms([r['train_loss'] for r in rows])} | "
                f"{_ms([r['last_batch_loss'] for r in rows])} | {_ms([r['acc'] for r in rows])} |"
            )
        none = [r["train_loss"] for r in results[(setting, "none")]]
        early = [r["train_loss"] for r in results[(setting, "early")]]
        std = [r["train_loss"] for r in results[(setting, "standard")]]
        diff = [e - n for e, n in zip(early, none, strict=True)]
        wins = sum(d < 0 for d in diff)
        std_diff = [s - n for s, n in zip(std, none, strict=True)]
        verdicts.append(
            f"- **{setting}**: early - none = {_ms(diff)} (paired); early < none in {wins}/"
            f"{len(diff)} seeds; standard - none = {_ms(std_diff)}. "
            + (
                "Early < none: reproduced at this scale."
                if statistics.mean(diff) < 0 and wins > len(diff) / 2
                else "Early < none: NOT reproduced at this scale."
            )
        )
    lines += ["", *verdicts, "", f"Wall time: {time.perf_counter() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
