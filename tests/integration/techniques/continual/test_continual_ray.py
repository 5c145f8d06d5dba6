"""Continual learning end to end: class-incremental digits with replay.

* `regimen run` on 2 DeepSpeed workers (real local Ray, gloo, MLflow sqlite): per-task
  continual-eval metrics and the final metrics reach MLflow, and both ranks hold the
  same replay buffer.
* In-process (gloo): a run stopped mid-stage and resumed ends with the same buffer,
  score table and weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from conftest import REPO
from orchestrator.engine.loop import Trainer, WorkerContext
from orchestrator.recipe import load_recipe
from orchestrator.techniques.continual.technique import Continual

pytestmark = pytest.mark.integration


def _recipe(tmp_path: Path, workers: int) -> Path:
    data = {
        "name": "cl_it",
        "model": {"kind": "builtin", "architecture": "mlp", "config": {"dropout": 0.0}},
        "data": {"kind": "digits", "eval_fraction": 0.3},
        "optimizer": {"lr": 3e-3},
        "schedule": {"steps": 30, "micro_batch_size": 8},
        "continual": {
            "stages": [
                {"name": "d01", "steps": 10, "classes": [0, 1]},
                {"name": "d23", "steps": 10, "classes": [2, 3]},
                {"name": "d45", "steps": 10, "classes": [4, 5]},
            ],
            "replay": {"size": 30, "policy": "class_balanced", "ratio": 0.25},
            "eval": {"every": 5, "subset_size": 20},
        },
        "checkpoint": {"every": 10, "keep": 0, "storage": str(tmp_path / "runs")},
        "resources": {"workers": workers},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "cl"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_run_logs_per_task_metrics_and_ranks_share_the_buffer(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(_recipe(tmp_path, 2)), "--json"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=500,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED" and summary["steps"] == 30

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = summary["run_id"]
    history = {
        t: {m.step: m.value for m in client.get_metric_history(run_id, f"cl/acc/task_{t}")}
        for t in range(3)
    }
    # evaluated every 5 steps on the tasks seen so far (task 1 from step 15, task 2 from 25)
    assert sorted(history[0]) == [5, 10, 15, 20, 25, 30]
    assert sorted(history[1]) == [15, 20, 25, 30] and sorted(history[2]) == [25, 30]
    assert history[0][10] > 0.9  # two classes learned by the end of the first stage
    share = client.get_metric_history(run_id, "cl/eval_time_share")
    assert share and all(0.0 < m.value < 1.0 for m in share)
    final = client.get_run(run_id).data.metrics
    for key in ("final_avg_acc", "avg_min_acc", "wc_acc", "bwt", "min_acc/task_0"):
        assert f"cl/final/{key}" in final, sorted(final)
    assert final["cl/final/min_acc/task_0"] <= history[0][30]  # a min is never above a value
    assert summary["continual"] == pytest.approx(  # `run --json` carries them too
        {k.removeprefix("cl/final/"): v for k, v in final.items() if k.startswith("cl/final/")}
    )

    ckpt = Path(summary["checkpoint"])
    files = [ckpt / "regimen" / f"rank{r:05d}.pt" for r in (0, 1)]
    states = [torch.load(f, weights_only=True)["techniques"]["continual"] for f in files]
    a, b = states[0]["buffer"], states[1]["buffer"]
    assert a["seen"] == b["seen"] > 0 and len(a["index"]) == 30
    assert all(torch.equal(a[k], b[k]) for k in ("task", "index", "label", "rng"))
    assert sorted(torch.bincount(a["label"]).tolist()) == [5] * 6  # 6 classes, balanced
    assert states[0]["stage"] == 2 and states[0]["stage_step"] == 10


def _continual(trainer: Trainer) -> Continual:
    return next(t for t in trainer.techniques if isinstance(t, Continual))


def test_resumed_run_has_the_uninterrupted_runs_buffer(tmp_path, gloo_world):
    recipe = load_recipe(_recipe(tmp_path, 1)).recipe
    straight = Trainer(recipe, WorkerContext(run_dir=tmp_path / "straight"))
    straight.run()
    Trainer(recipe, WorkerContext(run_dir=tmp_path / "split", stop_after_steps=15)).run()
    resumed = Trainer(recipe, WorkerContext(run_dir=tmp_path / "split"))
    summary = resumed.run()
    assert resumed.events[0]["kind"] == "resume" and resumed.events[0]["from_step"] == 10
    a, b = _continual(straight).buffer.state_dict(), _continual(resumed).buffer.state_dict()
    assert a["seen"] == b["seen"] and all(
        torch.equal(a[k], b[k]) for k in ("task", "index", "label", "rng")
    )
    assert _continual(straight).table == _continual(resumed).table
    wa = straight.built.engine.module.state_dict()
    wb = resumed.built.engine.module.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert summary["continual"]["metrics"] == _continual(straight).final
