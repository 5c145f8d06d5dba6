"""Per-step cost of metric logging: Regimen's MetricSink.log vs none vs synchronous MLflow.

One process, one tiny LLaMA (the test suite's: 2 layers, hidden 32, seq 32, micro-batch
4) trained with plain torch AdamW on CPU, 1 thread. Three arms run interleaved, round
after round, so that machine noise hits them alike:

* ``none``: the step only;
* ``sink``: the step + ``MetricSink.log(step, 6 metrics)`` (async, spooling sink);
* ``sync``: the step + ``MlflowClient.log_batch`` of the same 6 metrics (synchronous).

MLflow is a sqlite store in a temp dir (``--uri`` to use a server instead). Each arm's
per-step overhead is its median step time minus ``none``'s, and is also measured in
isolation (the logging call alone, timed around it) since the step noise on a shared
machine is larger than the sink's cost. Prints a table and one JSON line.

    python bench/tracking.py [--steps 200] [--rounds 5] [--uri URI]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def tiny_model() -> Any:
    """The tiny LLaMA of tests/conftest.py and an optimizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def main() -> None:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="steps per arm per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--uri", default=None, help="MLflow tracking URI (default: temp sqlite)")
    args = ap.parse_args()

    import torch
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from orchestrator.tracking.runs import open_run
    from orchestrator.tracking.sink import MetricSink

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="regimen-bench-tracking-"))
    uri = args.uri or f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    sink_run = open_run(uri, "bench-tracking", "sink")
    sync_run = open_run(uri, "bench-tracking", "sync")
    sink = MetricSink(uri, sink_run, spool_dir=tmp / "spool")
    model, opt = tiny_model()
    batch = torch.randint(0, 256, (4, 32))

    def step() -> float:
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def metrics(loss: float, n: int) -> dict[str, float]:
        return {"loss": loss, "lr": 1e-3, "grad_norm": 1.0, "step_time_s": 0.01,
                "samples_per_s": 400.0, "skipped": 0.0} | {"n": float(n)}  # fmt: skip

    step_times: dict[str, list[float]] = {"none": [], "sink": [], "sync": []}
    call_times: dict[str, list[float]] = {"sink": [], "sync": []}
    counter = 0
    for _ in range(20):  # warm-up
        step()
    for _ in range(args.rounds):
        for arm in ("none", "sink", "sync"):
            for _ in range(args.steps):
                counter += 1
                t0 = time.perf_counter()
                loss = step()
                t1 = time.perf_counter()
                if arm == "sink":
                    sink.log(counter, metrics(loss, counter))
                elif arm == "sync":
                    ts = int(time.time() * 1000)
                    points = [Metric(k, v, ts, counter) for k, v in metrics(loss, counter).items()]
                    client.log_batch(sync_run, metrics=points, synchronous=True)
                t2 = time.perf_counter()
                step_times[arm].append(t2 - t0)
                if arm != "none":
                    call_times[arm].append(t2 - t1)
    t_flush = time.perf_counter()
    sink.close()
    flush_s = time.perf_counter() - t_flush
    sent = len(client.get_metric_history(sink_run, "loss"))

    base = statistics.median(step_times["none"])
    result: dict[str, Any] = {"step_ms": round(base * 1e3, 3), "metrics_per_step": 7}
    print(f"tiny-model step (no logging): median {base * 1e3:.2f} ms over "
          f"{len(step_times['none'])} steps")  # fmt: skip
    print(f"{'arm':<6} {'median step ms':>15} {'log call us (median)':>21} {'call / step':>12}")
    for arm in ("none", "sink", "sync"):
        med = statistics.median(step_times[arm])
        call = statistics.median(call_times[arm]) if arm in call_times else 0.0
        ratio = call / base
        result[arm] = {"step_ms": round(med * 1e3, 3), "call_us": round(call * 1e6, 1),
                       "call_over_step": round(ratio, 5)}  # fmt: skip
        print(f"{arm:<6} {med * 1e3:>15.3f} {call * 1e6:>21.1f} {ratio:>11.2%}")
    sink_call = result["sink"]["call_us"]
    sync_call = result["sync"]["call_us"]
    result["sync_over_sink_call"] = round(sync_call / sink_call, 1) if sink_call else None
    result["sink_points_delivered"] = sent
    result["sink_points_logged"] = args.rounds * args.steps
    result["sink_close_s"] = round(flush_s, 3)
    print(f"sync log_batch costs {result['sync_over_sink_call']}x a MetricSink.log call; "
          f"sink delivered {sent}/{args.rounds * args.steps} loss points "
          f"(close took {flush_s:.2f} s)")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
