"""Chaos: the Ray head dies mid-run and a fresh one is started; `regimen resume` continues.

A real ``ray start --head`` cluster runs `regimen run --address`; the cluster is killed
(every process of it, the node's disk with it), a new head comes up at a new address, and
`regimen resume RUN_ID --address NEW` continues from the checkpoints mirrored to
``checkpoint.storage`` (a file:// URI: pyarrow's path, the same as s3://).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from chaos.run_helpers import mlp_recipe, regimen, write_recipe

from conftest import kill_session, wait_for
from ray_cluster import ray_cluster

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

STEPS = 3000


def test_resume_on_a_fresh_head_after_the_cluster_died(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    recipe = mlp_recipe(
        steps=STEPS, every=50, keep=2, workers=2,
        checkpoint={"storage": f"file://{bucket}", "local_dir": str(tmp_path / "node-disk")},
        tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "head"},
    )  # fmt: skip
    write_recipe(tmp_path / "r.yaml", recipe)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    started = time.monotonic()

    with ray_cluster(tmp_path / "first") as first:
        driver = regimen(tmp_path, "run", "r.yaml", "--address", first.gcs, "--json",
                         env=first.env)  # fmt: skip
        try:
            wait_for(lambda: len(list(bucket.glob("*/checkpoints/step-*/manifest.json"))) >= 2,
                  300, "two checkpoints mirrored to storage")  # fmt: skip
        except AssertionError:
            kill_session(driver)
            raise AssertionError(driver.communicate(timeout=10)) from None
    # The head and every worker are gone now; the driver loses its cluster.
    try:
        out, err = driver.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        kill_session(driver)
        out, err = driver.communicate(timeout=10)
        pytest.fail(f"the driver hung for 120 s after its cluster died:\n{err[-3000:]}")
    assert driver.returncode != 0 and "Traceback" not in err, err[-3000:]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (run,) = [r for r in runs if r.data.tags.get("regimen.role") != "sweep"]
    assert run.info.status != "FINISHED"
    shutil.rmtree(tmp_path / "node-disk")  # the node's disk went with the cluster
    killed_at = time.monotonic() - started

    with ray_cluster(tmp_path / "second") as second:
        proc = regimen(tmp_path, "resume", run.info.run_id, "--address", second.gcs, "--json",
                       env=second.env)  # fmt: skip
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    resumed = json.loads(out.strip().splitlines()[-1])
    assert resumed["status"] == "FINISHED" and resumed["steps"] == STEPS, (resumed, err[-3000:])
    new = client.get_run(resumed["run_id"])
    restored = int(new.data.tags["regimen.restored_step"])
    assert 50 <= restored < STEPS  # from storage, mid-run: the kill landed during training
    assert client.get_run(run.info.run_id).info.status in ("FAILED", "KILLED")
    steps = {m.step for m in client.get_metric_history(resumed["run_id"], "loss")}
    assert steps and min(steps) == restored + 1 and max(steps) == STEPS
    print(
        f"\nCHAOS head-restart steps={STEPS} restored_step={restored} "
        f"killed_after={killed_at:.0f}s total={time.monotonic() - started:.0f}s"
    )
