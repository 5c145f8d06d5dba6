"""LISA against full fine-tuning and LoRA: optimizer-state bytes, peak memory, switch cost, loss.

One LLaMA-style model (default: 8 layers, hidden 128, vocab 2048, about 2.1 M
parameters, fp32) trained by Regimen's own loop (DeepSpeed ZeRO-2, world size 1,
CPU/gloo) on the stdlib byte corpus, the same steps, data and LR for every
config. Each config runs in a fresh subprocess, so its peak RSS is its own:

* full: every parameter trains;
* lora-r8 / lora-r128: peft LoRA on all linear layers of the blocks (not lm_head);
* lisa-g1 / g2 / g4: LISA, gamma = 1, 2, 4; embeddings, head, final norm always on.

Reported per config: optimizer-state bytes (max over steps; torch moments +
DeepSpeed fp32 master partitions), LISA's against the theoretical
``12 B x (embeddings + head + norm + gamma layers)`` and whether it ever grew
over intervals; peak process RSS; mean step time; switch (engine rebuild) time
against the interval time; mean training loss of the last 5 steps and eval loss.

    python bench/lisa_memory.py [--steps 24] [--interval 8]

With ``--gpu`` the same six configs run on one CUDA device in bf16 (NCCL, world
size 1) for a TinyLlama-shaped model of 1.1 B parameters (22 layers, hidden 2048,
vocab 32000, sequence 512); memory is ``torch.cuda.max_memory_allocated`` and the
step-time ratios LISA/full and LISA/LoRA are printed.

    python bench/lisa_memory.py --gpu [--steps 30] [--interval 10]

Writes bench/out/lisa_memory.md (``lisa_memory_gpu.md`` with ``--gpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

LAYERS, HIDDEN, INTER, VOCAB = 8, 128, 344, 2048
HF_CONFIG = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
}
# TinyLlama-1.1B's shape (random weights: memory and time do not depend on them).
GPU_HF_CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}
GPU = os.environ.get("LISA_BENCH_GPU") == "1" or "--gpu" in sys.argv
if GPU:
    HF_CONFIG = GPU_HF_CONFIG
    LAYERS, HIDDEN, VOCAB = 22, 2048, 32000
CONFIGS = ["full", "lora-r8", "lora-r128", "lisa-g1", "lisa-g2", "lisa-g4"]
BYTES_PER_ELEM = 12  # ZeRO-2 fp32: master copy + exp_avg + exp_avg_sq


def lora_model(r: int, seed: int = 0) -> Any:
    """The benchmark's LLaMA with peft LoRA (rank ``r``) on all linear layers of the blocks."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model("llama", **HF_CONFIG)
    cfg._attn_implementation = "eager"
    base = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    lora = peft.LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(base, lora)


def _recipe_data(name: str, steps: int, interval: int, tmp: Path) -> dict[str, Any]:
    model: dict[str, Any] = {"kind": "hf_config", "architecture": "llama", "config": HF_CONFIG}
    techniques: dict[str, Any] = {}
    if name.startswith("lora"):
        model = {
            "kind": "factory",
            "factory": "lisa_memory:lora_model",
            "factory_args": {"r": int(name[6:])},
        }
    elif name.startswith("lisa"):
        techniques["lisa"] = {"gamma": int(name[6:]), "interval": interval}
    return {
        "name": f"bench-{name}",
        "seed": 0,
        "model": model,
        "data": {"kind": "stdlib_bytes", "seq_len": 512 if GPU else 32, "max_bytes": 400_000},
        "optimizer": {"name": "adamw", "lr": 1e-4 if GPU else 1e-3},
        "precision": "bf16" if GPU else "fp32",
        "schedule": {"steps": steps, "micro_batch_size": 4, "eval_batches": 4},
        "checkpoint": {"every": 0, "keep": 1, "at_end": False, "storage": str(tmp / "runs")},
        "resources": {"workers": 1, "threads_per_worker": 2},
        "techniques": techniques,
        "deepspeed": {"zero_optimization": {"stage": int(os.environ.get("LISA_BENCH_ZERO", "2"))}},
        **({} if GPU else {"tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"}}),
    }


def _one(name: str, steps: int, interval: int) -> dict[str, Any]:
    """Train one config in this process; return its figures."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_PORT", "29611")
    import torch
    import torch.distributed as dist

    if GPU:
        torch.cuda.set_device(0)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from orchestrator.engine.loop import Trainer, WorkerContext
    from orchestrator.recipe.loader import load_recipe_data
    from orchestrator.techniques.lisa import find_layers, optimizer_state_bytes

    dist.init_process_group("nccl" if GPU else "gloo", rank=0, world_size=1)
    tmp = Path(tempfile.mkdtemp(prefix="lisa-bench-"))
    recipe = load_recipe_data(_recipe_data(name, steps, interval, tmp), "<bench>")
    rec: dict[str, Any] = {"bytes": [], "step_s": [], "rebuild_s": [], "loss": []}

    class Measured(Trainer):
        def run_step(self) -> dict[str, float]:
            t0 = time.perf_counter()
            m = super().run_step()
            if GPU:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            rec["bytes"].append(optimizer_state_bytes(self.built.engine.optimizer))
            rec["loss"].append(m["loss"])
            if "engine_rebuild_s" in m:
                rec["rebuild_s"].append(m["engine_rebuild_s"])
                elapsed -= m["engine_rebuild_s"]
            rec["step_s"].append(elapsed)
            return m

    trainer = Measured(recipe, WorkerContext(run_dir=tmp / "run"))
    summary = trainer.run()
    model = trainer.model
    _, layers = find_layers(model)
    layer_ids = {id(p) for p in layers.parameters()}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in layer_ids)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "name": name,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_now": trainable,
        "outside": outside,
        "per_layer": per_layer,
        "bytes_first": rec["bytes"][0],
        "bytes_max": max(rec["bytes"]),
        "bytes_min": min(rec["bytes"]),
        "step_s": statistics.median(rec["step_s"][1:]),
        "rebuild_s": statistics.mean(rec["rebuild_s"]) if rec["rebuild_s"] else None,
        "switches": len(rec["rebuild_s"]),
        "loss_last5": statistics.mean(rec["loss"][-5:]),
        "eval_loss": summary.get("eval_loss"),
        "peak_rss": (
            torch.cuda.max_memory_allocated()
            if GPU
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ),
        "device": torch.cuda.get_device_name(0) if GPU else "cpu",
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _table(rows: list[dict[str, Any]], interval: int) -> str:
    full = next(r for r in rows if r["name"] == "full")
    out = [
        "| config | optimizer state MiB | vs full | theory MiB | vs theory | grew? "
        f"| peak {'GPU' if GPU else 'RSS'} MiB | vs full | step s | switch s (x interval) "
        "| loss last 5 | eval loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        theory = "-"
        vs_theory = "-"
        if r["name"].startswith("lisa"):
            gamma = int(r["name"][6:])
            t = BYTES_PER_ELEM * (r["outside"] + gamma * r["per_layer"])
            theory, vs_theory = _mib(t), f"{r['bytes_max'] / t:.3f}"
        elif r["name"] == "full":
            t = BYTES_PER_ELEM * r["params"]
            theory, vs_theory = _mib(t), f"{r['bytes_max'] / t:.3f}"
        switch = "-"
        if r["rebuild_s"] is not None:
            switch = f"{r['rebuild_s']:.2f} ({r['rebuild_s'] / (interval * r['step_s']):.2f})"
        grew = "yes" if r["bytes_max"] > r["bytes_first"] * 1.001 else "no"
        eval_loss = f"{r['eval_loss']:.3f}" if r["eval_loss"] is not None else "-"
        out.append(
            f"| {r['name']} | {_mib(r['bytes_max'])} | {r['bytes_max'] / full['bytes_max']:.3f} "
            f"| {theory} | {vs_theory} | {grew} | {_mib(r['peak_rss'])} "
            f"| {r['peak_rss'] / full['peak_rss']:.3f} | "
            f"{r['step_s']:.3f} | {switch} | {r['loss_last5']:.3f} | {eval_loss} |"
        )
    return "\n".join(out)


def _step_ratios(rows: list[dict[str, Any]]) -> str:
    """Step time of each LISA config against full fine-tuning and both LoRA ranks."""
    by = {r["name"]: r["step_s"] for r in rows}
    lines = ["", "| step-time ratio | vs full | vs lora-r8 | vs lora-r128 |", "|---|---|---|---|"]
    for name in (n for n in by if n.startswith("lisa")):
        lines.append(
            f"| {name} | {by[name] / by['full']:.2f} | {by[name] / by['lora-r8']:.2f} "
            f"| {by[name] / by['lora-r128']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--interval", type=int, default=8)
    parser.add_argument("--gpu", action="store_true", help="1.1 B model, bf16, one CUDA device")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(_one(args.one, args.steps, args.interval)))
        return
    started = time.perf_counter()
    rows = []
    for i, name in enumerate(CONFIGS):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--steps",
            str(args.steps),
            "--interval",
            str(args.interval),
        ]
        env = {
            **os.environ,
            "MASTER_PORT": str(29611 + i),
            "PYTHONWARNINGS": "ignore",
            **({"LISA_BENCH_GPU": "1"} if GPU else {"DS_ACCELERATOR": "cpu"}),
        }
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, check=False, timeout=600
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[-1][7:]))
        print(f"{name}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    full = rows[0]
    header = (
        f"LLaMA-style {LAYERS} layers, hidden {HIDDEN}, vocab {VOCAB}: "
        f"{full['params'] / 1e6:.2f} M params ({full['per_layer'] / 1e3:.0f} k per layer, "
        f"{full['outside'] / 1e6:.2f} M outside the layers); "
        + (
            f"bf16, DeepSpeed ZeRO-2, 1 GPU ({full['device']}), sequence 512, micro-batch 4, "
            "eager attention; "
            if GPU
            else "fp32, DeepSpeed ZeRO-2, 1 CPU worker; "
        )
        + f"{args.steps} steps, LISA interval {args.interval}; "
        f"wall {time.perf_counter() - started:.0f} s.\n\n"
        "theory = 12 B x (embeddings + head + final norm + gamma layers) for LISA, "
        "12 B x all params for full. grew? = optimizer state ever above its first-step value. "
        "switch s = engine rebuild seconds (x interval = its share of one interval's step time). "
        "loss: mean training loss of the last 5 steps.\n"
    )
    text = header + "\n" + _table(rows, args.interval) + "\n" + _step_ratios(rows) + "\n"
    print(text)
    out = REPO / "bench" / "out" / ("lisa_memory_gpu.md" if GPU else "lisa_memory.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"Command: `python bench/lisa_memory.py {'--gpu ' if GPU else ''}--steps {args.steps} "
        f"--interval {args.interval}`\n\n" + text
    )
    for r in rows:
        if r["name"].startswith("lisa"):
            gamma = int(r["name"][6:])
            theory = BYTES_PER_ELEM * (r["outside"] + gamma * r["per_layer"])
            ok = (
                abs(r["bytes_max"] / theory - 1) <= 0.05
                and r["bytes_max"] <= r["bytes_first"] * 1.001
            )
            if not ok:
                sys.exit(
                    f"{r['name']}: optimizer state {r['bytes_max']} vs theory {theory} or it grew"
                )


if __name__ == "__main__":
    main()
