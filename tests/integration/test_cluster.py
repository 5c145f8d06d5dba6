"""Ray Jobs against a real local cluster started here: a head and a second worker node
(tests/ray_cluster.py: token authentication on, torn down by pid, every wait bounded).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import REPO
from ray_cluster import Cluster, ray_cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

DATA = Path(__file__).parent / "data"


def _tiny_recipe() -> dict:
    ci = REPO / "recipes" / "ci" / "tiny.yaml"
    return yaml.safe_load((ci if ci.exists() else DATA / "tiny.yaml").read_text())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with ray_cluster(tmp_path_factory.mktemp("cluster"), second_node=True) as c:
        yield c


def _regimen(
    c: Cluster, cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 400
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        env=env or c.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _write(c: Cluster, name: str, **changes: object) -> tuple[Path, str]:
    """A tiny recipe with absolute MLflow/storage paths (the cluster shares this disk)."""
    work = c.root / name
    work.mkdir()
    recipe = _tiny_recipe()
    recipe["name"] = name
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            recipe.setdefault(section, {})[field] = value
        else:
            recipe[section] = value
    uri = f"sqlite:///{work}/mlflow.db"
    recipe["tracking"] = {"uri": uri, "experiment": name}
    recipe.setdefault("checkpoint", {})["storage"] = str(work / "runs")
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, uri


def _job_json(c: Cluster, cwd: Path, job: str) -> dict:
    proc = _regimen(c, cwd, "status", job, "--address", c.url, "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_submit_wait_logs_status_list(cluster: Cluster) -> None:
    recipe, uri = _write(cluster, "submitted")
    proc = _regimen(cluster, recipe.parent, "submit", str(recipe), "--address", cluster.url,
                    "--wait", "--json", "optimizer.lr=0.004")  # fmt: skip
    returned = time.time()
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    job = done["job_id"]
    assert done["status"] == "SUCCEEDED", proc.stderr[-6000:]
    # --wait notices the end within a poll, not when Ray's log tail closes (4-5 s later)
    assert returned - done["end_time"] / 1000 < 3.0, (returned, done["end_time"])
    assert "FINISHED" in proc.stderr  # the job's log arrived whole, up to its last lines
    assert done["metadata"]["regimen.recipe"] == "submitted"
    assert [r["status"] for r in done["runs"]] == ["FINISHED"]
    run = mlflow.MlflowClient(uri).get_run(done["runs"][0]["run_id"])
    assert run.data.tags["regimen.job_id"] == job
    assert run.data.params.get("optimizer.lr") in ("0.004", "0.004000")
    assert "recipe.yaml" in [
        a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id)
    ]

    logs = _regimen(cluster, recipe.parent, "logs", job, "--address", cluster.url, timeout=60)
    assert logs.returncode == 0 and "FINISHED" in logs.stdout and run.info.run_id in logs.stdout
    listed = _regimen(
        cluster, recipe.parent, "list", "--address", cluster.url, "--json", timeout=60
    )
    assert job in [j["job_id"] for j in json.loads(listed.stdout)]
    table = _regimen(cluster, recipe.parent, "status", job, "--address", cluster.url, timeout=60)
    assert "SUCCEEDED" in table.stdout and run.info.run_id in table.stdout


def test_stop_running_job(cluster: Cluster) -> None:
    recipe, uri = _write(cluster, "stopped", schedule={"steps": 5000, "micro_batch_size": 4})
    proc = _regimen(cluster, recipe.parent, "submit", str(recipe), "--address", cluster.url,
                    timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = proc.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        state = _job_json(cluster, recipe.parent, job)
        if any(r["status"] == "RUNNING" for r in state["runs"]):
            break
        assert state["status"] in ("PENDING", "RUNNING"), state
        time.sleep(2)
    else:
        pytest.fail(f"job {job} never started training: {state}")
    run_id = state["runs"][0]["run_id"]
    time.sleep(3)  # let a few steps happen
    stop = _regimen(cluster, recipe.parent, "stop", job, "--address", cluster.url, timeout=60)
    assert stop.returncode == 0, stop.stderr
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        state = _job_json(cluster, recipe.parent, job)
        if state["status"] == "STOPPED" and state["runs"][0]["status"] != "RUNNING":
            break
        time.sleep(2)
    assert state["status"] == "STOPPED", state
    assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "KILLED"


def test_sweep_runs_variants_concurrently(cluster: Cluster) -> None:
    recipe, uri = _write(
        cluster,
        "swept",
        schedule={"steps": 24, "micro_batch_size": 4},
        sweep={"grid": {"optimizer.lr": [0.001, 0.002, 0.004]}, "max_concurrent": 3},
    )
    proc = _regimen(cluster, recipe.parent, "submit", str(recipe), "--address", cluster.url,
                    "--wait", "--json", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    roles = [r["role"] for r in done["runs"]]
    assert roles.count("sweep") == 1 and len(roles) == 4, done["runs"]
    client = mlflow.MlflowClient(uri)
    parent = next(r for r in done["runs"] if r["role"] == "sweep")
    assert client.get_run(parent["run_id"]).info.status == "FINISHED"
    children = [client.get_run(r["run_id"]) for r in done["runs"] if r["role"] != "sweep"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {parent["run_id"]}
    spans = [(r.info.start_time, r.info.end_time) for r in children]
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most >= 2, f"variants never overlapped: {spans}"


def test_token_errors_are_clear(cluster: Cluster, tmp_path: Path) -> None:
    recipe, _ = _write(cluster, "tokens")
    wrong = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    proc = _regimen(cluster, tmp_path, "list", "--address", cluster.url, env=wrong, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "rejected the auth token" in proc.stderr and "RAY_AUTH_TOKEN" in proc.stderr
    assert "Traceback" not in proc.stderr

    missing = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    missing["HOME"] = str(tmp_path)  # no ~/.ray/auth_token there
    proc = _regimen(cluster, tmp_path, "submit", str(recipe), "--address", cluster.url,
                    env=missing, timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "requires an auth token" in proc.stderr and "Traceback" not in proc.stderr


def test_refuses_what_can_never_fit(cluster: Cluster) -> None:
    recipe, _ = _write(cluster, "toobig", resources={"workers": 2, "cpus_per_worker": 3})
    proc = _regimen(cluster, recipe.parent, "run", str(recipe), "--address", cluster.gcs,
                    timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no single node has that much" in proc.stderr and "Traceback" not in proc.stderr
    recipe, _ = _write(cluster, "strict", resources={"workers": 3, "placement": "STRICT_PACK"})
    proc = _regimen(cluster, recipe.parent, "run", str(recipe), "--address", cluster.gcs,
                    timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "STRICT_PACK" in proc.stderr, proc.stderr[-3000:]
