"""SGG against plain AdamW, side by side in one process: optimizer-step time and tiny-LM loss.

1. Step time. One LLaMA-style model (default hidden 256, 4 layers, about 3.4 M
   parameters), gradients filled once with fixed random values; AdamW exactly as
   Regimen builds it (``foreach=False``) over the same per-layer param groups,
   alone and wrapped by SGG (scale factors active). Rounds alternate the two and
   the median of each is taken. The recluster (k-means + MDA, every T steps) is
   timed on its own and reported amortized over the paper's T = 500.
2. Loss. The tiny LLaMA of the tests (hidden 32, 2 layers) on stdlib byte data,
   N steps, AdamW vs AdamW+SGG (T = 5% of N as in the paper, beta3 = 0.99 and a
   faster beta3 = 0.9), 3 seeds x 2 learning rates; mean training loss of the
   last 10 steps and the eval loss at the end.

    python bench/sgg.py [--steps 150] [--rounds 30]
    python bench/sgg.py --device cuda --hidden 2048 --layers 22 --timing-only  # ~0.93 B, GPU

Writes bench/out/sgg.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.techniques.sgg import SGGConfig, SGGOptimizer


def _llama(hidden: int, layers: int, seed: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(
        "llama",
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 64),
        num_key_value_heads=max(2, hidden // 64),
        max_position_embeddings=256,
    )
    cfg._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _groups(model: torch.nn.Module) -> list[dict]:
    big = [{"params": [p], "sgg": True} for p in model.parameters() if p.dim() >= 2]
    small = [p for p in model.parameters() if p.dim() < 2]
    return big + ([{"params": small, "sgg": False}] if small else [])


def _adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_step_time(
    hidden: int, layers: int, rounds: int, inner_steps: int, device: str = "cpu"
) -> dict[str, float]:
    """Median optimizer-step time of AdamW alone and wrapped by SGG, same model and gradients."""
    m_plain = _llama(hidden, layers, 0).to(device)
    m_sgg = _llama(hidden, layers, 0).to(device)
    gen = torch.Generator().manual_seed(1)
    for pa, pb in zip(m_plain.parameters(), m_sgg.parameters(), strict=False):
        g = (torch.randn(pa.shape, generator=gen) * 1e-3).to(device)
        pa.grad, pb.grad = g.clone(), g.clone()
    plain = _adamw(_groups(m_plain), 1e-4)
    sgg = SGGOptimizer(_adamw(_groups(m_sgg), 1e-4), SGGConfig(recluster_interval=2))
    for _ in range(4):  # warm up; SGG reclusters at step 2 and 4, factors active from step 3
        plain.step()
        sgg.step()
    sgg.cfg = SGGConfig(recluster_interval=10**9)
    t_plain, t_sgg = [], []
    for _ in range(rounds):
        for opt, out in ((plain, t_plain), (sgg, t_sgg)):
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner_steps):
                opt.step()
            _sync(device)
            out.append((time.perf_counter() - start) / inner_steps)
    layers_p = [p for g in sgg.param_groups if g["sgg"] for p in g["params"]]
    t_rec = []
    for _ in range(max(3, rounds // 5)):
        _sync(device)
        start = time.perf_counter()
        for p in layers_p:
            sgg.recluster(p, sgg.state[p]["exp_avg"])
        for g in sgg.param_groups:
            g["sgg_pending"] = g["sgg"]
        sgg.finalize()
        _sync(device)
        t_rec.append(time.perf_counter() - start)
    n_params = sum(p.numel() for p in m_plain.parameters())
    plain_s, sgg_s, rec_s = (
        statistics.median(t_plain),
        statistics.median(t_sgg),
        statistics.median(t_rec),
    )
    return {
        "params": n_params,
        "adamw_ms": plain_s * 1e3,
        "sgg_ms": sgg_s * 1e3,
        "ratio": sgg_s / plain_s,
        "recluster_ms": rec_s * 1e3,
        "ratio_amortized_T500": (sgg_s + rec_s / 500) / plain_s,
    }


def _batches(seq: int, batch: int, seed: int):
    from orchestrator.data import BatchSource, build_data
    from orchestrator.recipe.schema import DataConfig

    split = build_data(DataConfig(kind="stdlib_bytes", seq_len=seq, max_bytes=400_000))
    return split, BatchSource(split.train, seed, batch, 0, 1)


def train_once(steps: int, lr: float, seed: int, variant: dict | None, data) -> tuple[float, float]:
    split, source = data
    torch.manual_seed(seed)
    model = _llama(32, 2, seed)
    opt: torch.optim.Optimizer = _adamw(_groups(model), lr)
    if variant is not None:
        opt = SGGOptimizer(opt, SGGConfig(**variant))
    losses = []
    for step in range(steps):
        batch = source.micro_batch_at(step * source.micro_batch, 0)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
    model.eval()
    with torch.no_grad():
        ev = []
        for b in range(8):
            idx = [(b * 8 + j) % len(split.eval) for j in range(8)]
            items = [split.eval[i] for i in idx]
            ev.append(
                float(model(**{k: torch.stack([it[k] for it in items]) for k in items[0]}).loss)
            )
    return statistics.mean(losses[-10:]), statistics.mean(ev)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lrs", default="3e-3,1e-2")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (step time only)")
    ap.add_argument("--timing-only", action="store_true", help="skip the loss comparison")
    args = ap.parse_args()
    torch.set_num_threads(2)
    began = time.perf_counter()

    timing = bench_step_time(args.hidden, args.layers, args.rounds, 5, args.device)
    print(timing, flush=True)
    if args.timing_only:
        where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
        table = (
            f"SGG step time on {where}, torch {torch.__version__}, fp32, "
            f"{timing['params'] / 1e6:.0f} M params "
            f"(hidden {args.hidden}, {args.layers} layers)\n\n"
            "| AdamW step | AdamW+SGG step | ratio | recluster (all layers) "
            "| ratio incl. recluster / 500 |\n|---|---|---|---|---|\n"
            f"| {timing['adamw_ms']:.2f} ms | {timing['sgg_ms']:.2f} ms | {timing['ratio']:.3f}x "
            f"| {timing['recluster_ms']:.1f} ms | {timing['ratio_amortized_T500']:.3f}x |\n"
        )
        out = REPO / "bench" / "out"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"sgg_timing_{args.device.split(':')[0]}.md").write_text(table)
        print(table)
        return

    interval = max(1, round(0.05 * args.steps))
    variants = {
        "adamw": None,
        f"adamw+sgg (T={interval}, beta3=0.99)": {
            "recluster_interval": interval,
            "scale_decay": 0.99,
        },
        f"adamw+sgg (T={interval}, beta3=0.9)": {
            "recluster_interval": interval,
            "scale_decay": 0.9,
        },
    }
    data = _batches(64, 8, 0)
    rows = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        for name, variant in variants.items():
            results = [
                train_once(args.steps, lr, seed, variant, data) for seed in range(args.seeds)
            ]
            tr = [r[0] for r in results]
            ev = [r[1] for r in results]
            rows.append((lr, name, tr, ev))
            print(lr, name, [f"{x:.4f}" for x in tr], [f"{x:.4f}" for x in ev], flush=True)

    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# SGG vs AdamW (bench/sgg.py)",
        "",
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"total {time.perf_counter() - began:.0f} s.",
        "",
        "## Optimizer step time (same model, same gradients, alternating rounds, median)",
        "",
        "| model params | AdamW step | AdamW+SGG step | ratio | recluster (all layers) "
        "| ratio incl. recluster / 500 |",
        "|---|---|---|---|---|---|",
        f"| {timing['params'] / 1e6:.2f} M | {timing['adamw_ms']:.2f} ms "
        f"| {timing['sgg_ms']:.2f} ms | "
        f"{timing['ratio']:.3f}x | {timing['recluster_ms']:.1f} ms "
        f"| {timing['ratio_amortized_T500']:.3f}x |",
        "",
        f"## Tiny LLaMA (hidden 32, 2 layers, seq 64, batch 8), "
        f"{args.steps} steps, {args.seeds} seeds",
        "",
        "Train = mean training loss of the last 10 steps; eval = mean loss on 8 held-out batches.",
        "",
        "| LR | optimizer | train (mean ± sd) | eval (mean ± sd) | per-seed train |",
        "|---|---|---|---|---|",
    ]
    for lr, name, tr, ev in rows:
        sd_tr = statistics.stdev(tr) if len(tr) > 1 else 0.0
        sd_ev = statistics.stdev(ev) if len(ev) > 1 else 0.0
        per = ", ".join(f"{x:.4f}" for x in tr)
        lines.append(
            f"| {lr:g} | {name} | {statistics.mean(tr):.4f} ± {sd_tr:.4f} | "
            f"{statistics.mean(ev):.4f} ± {sd_ev:.4f} | {per} |"
        )
    (out / "sgg.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
