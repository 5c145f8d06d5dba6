"""Rollback, restart and resume on real Ray (2 DeepSpeed workers, gloo, CPU) with MLflow lineage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from conftest import REPO, TINY_RECIPE, kill_session, tiny_recipe
from orchestrator.recipe.jobspec import JobSpec

pytestmark = pytest.mark.integration

GUARD = {"window": 16, "min_history": 4, "patience": 1, "good_after": 1, "skip_batches": 2}
GUARD |= {"grad_norm_zscore": False}
BASE = {"schedule": {"steps": 10, "micro_batch_size": 2}, "checkpoint": {"every": 2, "keep": 0}}
BASE |= {
    "resources": {"workers": 2, "max_restarts": 1},
    "deepspeed": {"zero_optimization": {"stage": 1}},
}


def _job(tmp_path, **sections):
    from orchestrator.control.controller import run_job

    recipe = tiny_recipe(tmp_path, **{**BASE, **sections})
    return run_job(JobSpec.of("tiny", recipe)), f"sqlite:///{tmp_path}/mlflow.db"


def _children(client, run):
    runs = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    return sorted(runs, key=lambda r: int(r.data.tags.get("regimen.segment", 0)))


def _model_states(checkpoint: str) -> dict[str, torch.Tensor]:
    path = Path(checkpoint) / "ds" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False, map_location="cpu")["module"]


def test_spike_detected_rolled_back_skipped_and_lineage_in_mlflow(tmp_path, ray_local):
    """Async checkpoints (2 ranks commit through markers) and leading indicators switched on."""
    faults = {"spike_at_step": 7, "spike_factor": 100.0}
    stability = {**GUARD, "indicators_every": 2, "update_rms_max": 1e6}  # logged, never warns
    result, uri = _job(
        tmp_path,
        stability=stability,
        techniques={"fault_injection": faults},
        checkpoint={"every": 2, "keep": 0, "async": True},
    )
    assert result.status == "FINISHED", result.error
    assert result.steps == 10 and result.rollbacks == 1
    client = mlflow.MlflowClient(uri)
    job = client.get_run(result.run_id)
    assert job.data.tags["regimen.rollbacks"] == "1"
    (seg,) = _children(client, job)
    tags = seg.data.tags
    assert seg.info.status == "FINISHED"
    assert tags["regimen.parent_run_id"] == job.info.run_id and tags["regimen.segment"] == "1"
    assert tags["regimen.restored_step"] == "6" and tags["regimen.from_step"] == "8"
    assert tags["regimen.detector"] == "loss_z" and float(tags["regimen.detector_value"]) > 6
    # global batch 2 x 2 workers = 4 samples; onset step 7 -> stream positions [28, 36)
    assert json.loads(tags["regimen.skipped_ranges"]) == [[28, 36]]
    job_loss = {m.step: m.value for m in client.get_metric_history(job.info.run_id, "loss")}
    assert sorted(job_loss) == list(range(1, 9))  # pre-rollback metrics kept, spike at its step
    assert job_loss[8] > 50 * job_loss[7]
    seg_loss = {m.step: m.value for m in client.get_metric_history(seg.info.run_id, "loss")}
    assert sorted(seg_loss) == [7, 8, 9, 10] and seg_loss[8] < job_loss[7] * 2
    anomaly = client.get_metric_history(job.info.run_id, "spike/loss_z")
    assert max(m.value for m in anomaly) > 6
    assert tags["regimen.warned_steps_before"] == ""  # no indicator warned before this spike
    rms = client.get_metric_history(job.info.run_id, "indicator/update_rms_max")
    assert sorted(m.step for m in rms) == [2, 4, 6]  # step 8 was skipped: no update, no RMS
    redo = client.get_metric_history(seg.info.run_id, "indicator/update_rms_max")
    assert sorted(m.step for m in redo) == [8, 10] and all(m.value > 0 for m in rms + redo)
    ckpts = sorted(p.name for p in (Path(result.run_dir) / "checkpoints").iterdir())
    assert ckpts == [f"step-{s:08d}" for s in (2, 4, 6, 8, 10)]  # all committed, no .tmp left


def test_rollback_budget_exhausted_fails_with_message(tmp_path, ray_local):
    faults = {"nan_at_step": 5}
    result, uri = _job(
        tmp_path, stability={**GUARD, "max_rollbacks": 0}, techniques={"fault_injection": faults}
    )
    assert result.status == "FAILED"
    assert "max_rollbacks=0" in result.error and "step 5" in result.error
    client = mlflow.MlflowClient(uri)
    assert client.get_run(result.run_id).info.status == "FAILED"


def test_killed_worker_recovers_to_identical_weights(tmp_path, ray_local):
    clean, _ = _job(tmp_path / "clean")
    killed, uri = _job(
        tmp_path / "killed", techniques={"fault_injection": {"kill_at_step": 5, "kill_rank": 1}}
    )
    assert clean.status == killed.status == "FINISHED", killed.error
    assert (Path(killed.run_dir) / "faults" / "kill.fired").exists()
    a, b = _model_states(clean.checkpoint), _model_states(killed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = mlflow.MlflowClient(uri).get_metric_history(killed.run_id, "loss")
    assert {m.step for m in losses} == set(range(1, 11))  # steps 5..6 logged twice, none lost


def _regimen(cwd: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


def test_sigterm_to_the_driver_ends_the_run_killed(tmp_path):
    """SIGTERM (a scheduler's stop, `kill PID`) acts as Ctrl-C even after Ray installed its
    own handler: the MLflow run ends KILLED and the command exits 130, never RUNNING."""
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe.update(BASE, schedule={"steps": 5000, "micro_batch_size": 2})
    recipe["resources"] = {"workers": 1}
    recipe["tracking"] = {"uri": "sqlite:///mlflow.db", "experiment": "term"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    driver = _regimen(tmp_path, "run", "r.yaml", "--json")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        deadline, run = time.time() + 180, None
        while time.time() < deadline and run is None:
            time.sleep(1)
            if not (tmp_path / "runs").exists():
                continue
            exps = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(exps) if exps else []
            if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                run = runs[0]  # training, with the handler Ray installed
        assert run is not None, "no training step logged within 180 s"
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
    finally:
        kill_session(driver)
    assert driver.returncode == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def test_resume_and_rollback_cli_after_driver_sigkill(tmp_path):
    """The driver dies with its embedded Ray, and the node-local checkpoints are lost too:
    `regimen resume` and `regimen rollback` continue from the object-storage mirror
    (a file:// URI through pyarrow, the same code path as s3://)."""
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe.update(BASE, schedule={"steps": 40, "micro_batch_size": 2})
    recipe["resources"] = {"workers": 2}
    recipe["tracking"] = {"uri": "sqlite:///mlflow.db", "experiment": "resume"}
    bucket = tmp_path / "bucket"
    recipe["checkpoint"] = {
        "every": 2, "keep": 0, "storage": f"file://{bucket}", "local_dir": "./runs",
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    driver = _regimen(tmp_path, "run", "r.yaml", "--json")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    deadline, run = time.time() + 180, None
    while time.time() < deadline:
        time.sleep(1)
        runs = (
            client.search_runs(
                client.search_experiments()[0:1]
                and [e.experiment_id for e in client.search_experiments()]
            )
            if (tmp_path / "mlflow.db").exists()
            else []
        )
        run = runs[0] if runs else None
        ckpts = list((tmp_path / "runs").glob("*/checkpoints/step-*/manifest.json"))
        if run is not None and len(ckpts) >= 2:
            break
    assert run is not None, driver.communicate(timeout=5)
    kill_session(driver)  # the node dies: the driver, its embedded Ray and the workers
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # stale
    mirrored = sorted(bucket.glob("*/checkpoints/step-*/manifest.json"))
    assert mirrored, "no committed checkpoint reached the storage URI"
    # The node's disk is gone with it (renamed, so a failure leaves it to look at).
    (tmp_path / "runs").rename(tmp_path / "lost-node-disk")

    proc = _regimen(tmp_path, "resume", run.info.run_id, "--json")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    resumed = json.loads(out.strip().splitlines()[-1])
    assert resumed["status"] == "FINISHED" and resumed["steps"] == 40, (resumed, err[-3000:])
    old, new = client.get_run(run.info.run_id), client.get_run(resumed["run_id"])
    assert old.info.status == "KILLED" and new.data.tags["regimen.reason"] == "resume"
    assert new.data.tags["regimen.parent_run_id"] == run.info.run_id
    assert int(new.data.tags["regimen.restored_step"]) >= 2
    assert new.data.tags["regimen.storage_uri"] == old.data.tags["regimen.storage_uri"]
    assert old.data.tags["regimen.resumes"] == "1"

    proc = _regimen(
        tmp_path, "rollback", resumed["run_id"], "--to-step", "5", "--skip-batches", "3",
        "--lr-scale", "0.5", "--json",
    )  # fmt: skip
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    rolled = json.loads(out.strip().splitlines()[-1])
    seg = client.get_run(rolled["run_id"])
    assert (
        seg.data.tags["regimen.reason"] == "rollback"
        and seg.data.tags["regimen.restored_step"] == "4"
    )
    assert json.loads(seg.data.tags["regimen.skipped_ranges"]) == [[16, 28]]  # cursor 4x4, 3x4
    assert seg.data.tags["regimen.lr_scale"] == "0.5"
    lrs = client.get_metric_history(rolled["run_id"], "lr")
    assert lrs and all(m.value == pytest.approx(0.5 * 3e-3) for m in lrs)
    running = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="attributes.status = 'RUNNING'",
    )
    assert not running
