"""The cost of the spike guard's confirmation by replay on the quickstart model (issue 17).

The quickstart's model, data, optimizer and warmup (recipes/quickstart.yaml) at world size 1
on CPU, in this process: ``--steps`` steps with a one-off fault (``transient_spike_at_step``)
and ``stability.replay: always``. Reported: the median step time, the replay's own time
(the ``replay`` event's ``seconds``: one forward and backward of the step's batch, the
gradients taken with ``torch.autograd.grad``), the replay as a share of a step, and the
end-to-end cost of the retry (the faulty step is skipped and its batch run again: one step).

    python bench/spike_replay.py [--steps 70] [--fault-at 60] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("PYTHONWARNINGS", "ignore")


def _recipe(args: argparse.Namespace, root: Path) -> Any:
    from bench.quickstart import quickstart_recipe

    return quickstart_recipe(
        {
            "data": {"seq_len": args.seq_len},
            "schedule": {"steps": args.steps, "eval_every": 0},
            "checkpoint": {"every": 1000, "storage": str(root / "runs"), "at_end": False},
            "resources": {"workers": 1, "threads_per_worker": 1},
            "tracking": {"uri": f"sqlite:///{root}/mlflow.db"},
            "stability": {"replay": "always"},
            "techniques": {"fault_injection": {"transient_spike_at_step": args.fault_at}},
        }
    )


def main() -> None:
    """Run the measurement and print one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=70)
    ap.add_argument("--fault-at", type=int, default=60)  # armed from 50
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import init_one_process_group
    from orchestrator.engine.loop import StepHook, Trainer, WorkerContext

    init_one_process_group("gloo")
    times: list[float] = []

    class Times(StepHook):
        def after_step(self, trainer: Any, metrics: dict[str, float]) -> None:
            times.append(metrics["step_time_s"])

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        trainer = Trainer(_recipe(args, root), WorkerContext(run_dir=root / "run"), [Times()])
        summary = trainer.run()
    replays = [e for e in summary["events"] if e["kind"] == "replay"]
    if not replays:
        raise SystemExit(
            f"no replay: the guard is armed from step warmup + min_history (50 on the "
            f"quickstart); --fault-at {args.fault_at} is earlier"
        )
    replay = replays[0]
    step_s = statistics.median(times[5:])
    print(
        json.dumps(
            {
                "model": "quickstart (LLaMA 4 x 64, vocab 256)",
                "seq_len": args.seq_len,
                "micro_batch": trainer.recipe.schedule.micro_batch_size,
                "median_step_s": round(step_s, 4),
                "replay_s": round(replay["seconds"], 4),
                "replay_share_of_step": round(replay["seconds"] / step_s, 2),
                "reproduced": replay["reproduced"],
                "retry_steps": summary["skipped_steps"],
                "rollbacks": summary["rollbacks"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
