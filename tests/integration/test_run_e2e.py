"""`regimen run` end to end: real local Ray, 2 DeepSpeed workers (CPU, gloo), MLflow in sqlite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import REPO, TINY_RECIPE
from orchestrator.timeline import PHASES, PROCESS_START, phase_seconds

pytestmark = pytest.mark.integration


def _write_recipe(tmp_path: Path, **changes) -> Path:
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe.update(
        schedule={"steps": 16, "micro_batch_size": 4, "eval_every": 8},
        checkpoint={"every": 8, "keep": 2, "storage": "./runs"},
        resources={"workers": 2},
        techniques={"warmup": {"warmup_steps": 2}},
        deepspeed={"zero_optimization": {"stage": 2}},
        tracking={"uri": "sqlite:///mlflow.db", "experiment": "e2e", "tags": {}},
        **changes,
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _regimen(tmp_path: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_run_records_everything_in_mlflow(tmp_path):
    recipe = _write_recipe(tmp_path)
    launched = time.time()
    proc = _regimen(tmp_path, "run", str(recipe), "--json", "optimizer.lr=0.005")
    wall = time.time() - launched
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"run_id", "status", "steps", "final_loss", "rollbacks", "checkpoint"} <= summary.keys()
    assert summary["status"] == "FINISHED" and summary["steps"] == 16 and summary["rollbacks"] == 0
    assert Path(summary["checkpoint"], "manifest.json").exists()

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.005"  # the override reached the resolved recipe
    assert run.data.params["resources.workers"] == "2"
    assert len(run.data.tags["regimen.recipe_sha256"]) == 64
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 17))  # every step, once
    assert losses[-1].value < losses[0].value  # it learned something
    evals = client.get_metric_history(run.info.run_id, "eval_loss")
    assert sorted(m.step for m in evals) == [8, 16]  # eval_every 8; the end does not eval twice
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    assert lrs[1] == pytest.approx(0.0025) and lrs[2] == pytest.approx(0.005)  # warmup 2 steps
    artifact = Path(client.download_artifacts(run.info.run_id, "recipe.yaml", str(tmp_path)))
    resolved = yaml.safe_load(artifact.read_text())
    assert resolved["optimizer"]["lr"] == 0.005 and resolved["schedule"]["steps"] == 16
    # the final model: a save_pretrained directory, and a logged model linked to the run
    exported = summary["export"]
    assert Path(exported["path"], "model.safetensors").is_file()
    assert run.data.tags["regimen.export"] == exported["path"]
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(exported["model_id"], 16)]
    linked = {m.key for m in client.get_logged_model(exported["model_id"]).metrics or []}
    assert {"final_loss", "final_eval_loss", "steps"} <= linked
    _check_startup(summary["startup"], wall, run.data.metrics)


def _check_startup(marks: dict[str, float], wall: float, metrics: dict[str, float]) -> None:
    """The driver's and rank 0's start-up marks: every phase present, in order, adding up
    to about the wall time; their lengths are the run's startup/* metrics."""
    phases = phase_seconds(marks)
    assert [label for label, _, _ in PHASES] == list(phases)  # every phase, both processes
    assert all(seconds >= 0 for seconds in phases.values()), phases
    # the MLflow store opens while Ray starts; the MLflow run opens while the workers start
    overlapping = {"mlflow_store", "mlflow_run_open"}
    serial = [m for label, begin, end in PHASES if label not in overlapping for m in (begin, end)]
    assert serial == sorted(serial, key=marks.__getitem__)  # one after the other
    span = marks["run.ended"] - marks[PROCESS_START]
    # what is left: Ray's stop and the exit (0.05 s); the process's start time (psutil,
    # from the boot time in clock ticks) is only good to a few tenths of a second
    assert -0.5 < wall - span < 15
    covered = sum(s for label, s in phases.items() if label not in overlapping)
    assert 0.75 * span <= covered <= span + 0.01, (covered, span, phases)
    logged = {k: v for k, v in metrics.items() if k.startswith("startup/")}
    # logged with the summary, before the run ends: all but the last phase
    expected = {f"startup/{label}_s" for label in phases} - {"startup/end_driver_mlflow_s"}
    assert logged.keys() == expected
    assert logged["startup/first_step_s"] == pytest.approx(phases["first_step"], abs=2e-3)


def test_bad_recipe_launches_nothing(tmp_path):
    recipe = _write_recipe(tmp_path, seed=-1)
    proc = _regimen(tmp_path, "run", str(recipe), timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{recipe}:" in proc.stderr and "seed" in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
