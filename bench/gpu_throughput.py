"""Tokens/s and MFU of Regimen's step loop against a bare DeepSpeed + Hugging Face script.

Both arms train the same LLaMA-shaped model (default: TinyLlama's shape, 1.1 B parameters:
22 layers, hidden 2048, 32 heads, 4 KV heads, vocab 32000) from random weights on the same
byte data, one CUDA device (NCCL, world size 1), bf16, ZeRO-2, fused AdamW, micro-batch 8 x
sequence 1024, and the same number of steps:

* bare: ``transformers.AutoModelForCausalLM.from_config`` (Hugging Face's default
  attention), ``torch.optim.AdamW(fused=True)``, ``deepspeed.initialize`` with a hand-written
  config, then forward / backward / step / ``loss.item()`` per step;
* regimen: Regimen's own loop (``Trainer``: technique hooks, all-reduced loss, skip gate,
  LR written every step, async MLflow metrics on a local sqlite store every step),
  in-process, no Ray; its model comes from the recipe (``model.kind: hf_config``).

Each arm runs in a fresh subprocess (its own CUDA context and memory), one after the other,
in one invocation. Tokens/s is micro-batch x sequence over the median start-to-start step
time over steps [warm, steps); MFU uses the same FLOPs-per-token estimate and peak table
as Regimen's ``mfu`` metric (orchestrator/engine/throughput.py). The attention
implementation of each arm is printed: a ratio between arms with different ones measures
the attention kernels, not the loop. Targets (issue 15): regimen >= 0.97 x bare tokens/s,
MFU within a few points.

    python bench/gpu_throughput.py [--steps 30] [--warm 10] [--layers 22] [--hidden 2048]
    python bench/gpu_throughput.py --tiny     # CPU, gloo, fp32, a tiny model: checks the script

Writes bench/out/gpu_throughput.md (``gpu_throughput_tiny.md`` with ``--tiny``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPU_SHAPE = {"layers": 22, "hidden": 2048, "inter": 5632, "heads": 32, "kv_heads": 4}
GPU_SHAPE |= {"vocab": 32000, "seq": 1024, "micro": 8, "steps": 30, "warm": 10}
TINY_SHAPE = {"layers": 2, "hidden": 64, "inter": 128, "heads": 4, "kv_heads": 4}
TINY_SHAPE |= {"vocab": 256, "seq": 64, "micro": 4, "steps": 8, "warm": 3}


def hf_config(a: argparse.Namespace) -> dict[str, Any]:
    """The model's Hugging Face config, identical for both arms."""
    return {
        "vocab_size": a.vocab,
        "hidden_size": a.hidden,
        "intermediate_size": a.inter,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "max_position_embeddings": a.seq,
    }


def recipe_data(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Regimen's recipe for the same run (also the source of the bare arm's data)."""
    return {
        "name": "gpu-throughput",
        "seed": 0,
        "precision": a.precision,
        "model": {"kind": "hf_config", "architecture": "llama", "config": hf_config(a)},
        "data": {"kind": "stdlib_bytes", "seq_len": a.seq, "max_bytes": 4_000_000},
        "optimizer": {"name": "adamw", "lr": 1e-4, "grad_clip": 1.0},
        "schedule": {"steps": a.steps, "micro_batch_size": a.micro, "log_every": 1},
        "checkpoint": {"every": 0, "at_end": False, "storage": str(workdir / "runs")},
        "tracking": {"uri": f"sqlite:///{workdir}/mlflow.db"},
        "resources": {"workers": 1},
        "deepspeed": {"zero_optimization": {"stage": a.zero}},
    }


def _init_world(device: str) -> None:
    import torch
    import torch.distributed as dist

    from tests.conftest import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bare_arm(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The minimal DeepSpeed + HF loop a person would write."""
    import deepspeed
    import torch
    import transformers

    from orchestrator.data import BatchSource, build_data
    from orchestrator.recipe.loader import load_recipe_data

    recipe = load_recipe_data(recipe_data(a, workdir), "<bench>")
    torch.set_num_threads(max(1, int(recipe.resources.cpus_per_worker)))  # as Regimen's
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**hf_config(a))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    on_cuda = a.device == "cuda"
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, **({"fused": True} if on_cuda else {"foreach": False})
    )
    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": a.micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": a.zero},
        "steps_per_print": 10**9,
    }
    if a.precision == "bf16":
        ds_config["bf16"] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    source = BatchSource(build_data(recipe.data).train, 0, a.micro, 0, 1)
    times: list[float] = []
    cursor, last = 0, time.perf_counter()
    for _ in range(a.steps):
        host = source.micro_batch_at(cursor, 0)
        batch = {k: v.to(engine.device, non_blocking=True) for k, v in host.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        loss.item()
        cursor += a.micro
        now = time.perf_counter()
        times.append(now - last)
        last = now
    _sync(a.device)
    return {
        "times": times,
        "attn": getattr(engine.module.config, "_attn_implementation", "?"),
        "model": engine.module,
    }


def regimen_arm(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Regimen's loop (``Trainer``), in-process, MLflow metrics every step."""
    from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
    from orchestrator.recipe.loader import load_recipe_data
    from orchestrator.tracking.runs import open_run

    recipe = load_recipe_data(recipe_data(a, workdir), "<bench>")
    uri = recipe.tracking.uri
    run_id = open_run(uri, "gpu-throughput", "bench") if not a.no_mlflow else None
    times: list[float] = []
    reported: list[dict[str, float]] = []

    class Timed(StepHook):
        def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            times.append(metrics["step_time_s"])
            reported.append({k: metrics[k] for k in ("tokens_per_s", "mfu") if k in metrics})

    ctx = WorkerContext(
        run_dir=workdir / "run", tracking_uri=None if a.no_mlflow else uri, run_id=run_id
    )
    trainer = Trainer(recipe, ctx, step_hooks=[Timed()])
    trainer.run()
    _sync(a.device)
    model = trainer.built.engine.module
    return {
        "times": times,
        "attn": getattr(getattr(model, "config", None), "_attn_implementation", "?"),
        "model": model,
        "reported": reported,
        "fused": bool(trainer.built.optimizer.defaults.get("fused")),
    }


def arm_main(a: argparse.Namespace) -> None:
    """One arm in this (fresh) process; writes its figures as JSON to ``a.out_json``."""
    import torch

    from orchestrator.engine.throughput import ModelShape, peak_flops

    _init_world(a.device)
    workdir = Path(tempfile.mkdtemp(prefix=f"gpu-throughput-{a.arm}-"))
    got = (bare_arm if a.arm == "bare" else regimen_arm)(a, workdir)
    shape = ModelShape.of(got.pop("model"))
    device_name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    out = {
        **got,
        "shape": shape.__dict__,
        "device_name": device_name,
        "peak": peak_flops(device_name, a.precision) if a.device == "cuda" else None,
        "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else None,
    }
    Path(a.out_json).write_text(json.dumps(out))


def summarise(a: argparse.Namespace, arm: dict[str, Any]) -> dict[str, Any]:
    """Median step time over [warm, steps), tokens/s and MFU."""
    from orchestrator.engine.throughput import flops_per_token

    window = arm["times"][a.warm :]
    step = statistics.median(window)
    tokens = a.micro * a.seq / step
    s = arm["shape"]
    flops = flops_per_token(s["matmul_params"], s["layers"], s["width"], a.seq)
    mfu = tokens * flops / arm["peak"] if arm["peak"] else None
    return {"step_s": step, "tokens_per_s": tokens, "mfu": mfu}


def _fmt_mfu(value: float | None) -> str:
    return f"{100 * value:.1f} %" if value is not None else "n/a"


def main() -> None:
    """Both arms, one after the other, each in a fresh process; the side-by-side table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU, gloo, fp32, a tiny model")
    for key in GPU_SHAPE:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    p.add_argument("--zero", type=int, default=2, choices=[0, 1, 2])
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--no-mlflow", action="store_true", help="regimen arm without a metric sink")
    p.add_argument("--arm", choices=["bare", "regimen"], help=argparse.SUPPRESS)
    p.add_argument("--out-json", help=argparse.SUPPRESS)
    a = p.parse_args()
    defaults = TINY_SHAPE if a.tiny else GPU_SHAPE
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.device = "cpu" if a.tiny else "cuda"
    a.precision = a.precision or ("fp32" if a.tiny else "bf16")
    if a.warm >= a.steps:
        p.error("--warm must be below --steps")
    if a.arm:
        arm_main(a)
        return
    if not a.tiny:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: run with --tiny to check the script on the CPU")
    env = {**os.environ, "DS_ACCELERATOR": a.device, "PYTHONPATH": str(REPO)}
    env |= {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in ("bare", "regimen"):
            out_json = Path(tmp) / f"{arm}.json"
            argv = [sys.executable, __file__, "--arm", arm, "--out-json", str(out_json)]
            argv += [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in GPU_SHAPE]
            argv += [f"--zero={a.zero}", f"--precision={a.precision}"]
            argv += ["--tiny"] * a.tiny + ["--no-mlflow"] * a.no_mlflow
            subprocess.run(argv, env=env, check=True, cwd=REPO)
            results[arm] = json.loads(out_json.read_text())
    bare, ours = summarise(a, results["bare"]), summarise(a, results["regimen"])
    ratio = ours["tokens_per_s"] / bare["tokens_per_s"]
    params = results["bare"]["shape"]["matmul_params"] / 1e6
    lines = [
        f"# bench/gpu_throughput.py{' --tiny' if a.tiny else ''}",
        "",
        f"{results['bare']['device_name']}, {a.precision}, ZeRO-{a.zero}, world size 1; "
        f"{a.layers} layers x hidden {a.hidden} ({params:,.1f} M matmul parameters), "
        f"micro-batch {a.micro} x seq {a.seq}; median over steps {a.warm}-{a.steps - 1}.",
        "",
        "| arm | attention | median step (ms) | tokens/s | MFU | peak mem (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, arm, s in (("bare DeepSpeed + HF", "bare", bare), ("regimen", "regimen", ours)):
        mem = results[arm]["max_mem_gb"]
        lines.append(
            f"| {name} | {results[arm]['attn']} | {1e3 * s['step_s']:.1f} | "
            f"{s['tokens_per_s']:,.0f} | {_fmt_mfu(s['mfu'])} | "
            f"{f'{mem:.1f}' if mem is not None else 'n/a'} |"
        )
    reported = results["regimen"]["reported"][a.warm :]
    own = [r["tokens_per_s"] for r in reported if "tokens_per_s" in r]
    own_mfu = [r["mfu"] for r in reported if "mfu" in r]
    logged = f"tokens_per_s {statistics.median(own):,.0f}" if own else "no tokens_per_s"
    logged += (
        f", mfu {_fmt_mfu(statistics.median(own_mfu))}"
        if own_mfu
        else ", no mfu (the CPU, or a device not in the peak table)"
    )
    lines += [
        "",
        f"**tokens/s ratio regimen / bare: {ratio:.3f}** (target >= 0.97); MFU "
        f"{_fmt_mfu(ours['mfu'])} vs {_fmt_mfu(bare['mfu'])} bare.",
        f"Regimen's own step metrics over the same steps: {logged}; "
        f"fused AdamW in regimen's arm: {results['regimen']['fused']}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"gpu_throughput{'_tiny' if a.tiny else ''}.md").write_text(text)


if __name__ == "__main__":
    main()
