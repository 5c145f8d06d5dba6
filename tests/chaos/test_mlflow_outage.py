"""MLflow server down for a while during training: training continues, metrics are replayed.

A real `mlflow server` (sqlite backend) is SIGKILLed while `regimen run` trains against it,
kept down for a few seconds, and restarted on the same port and store. The run must finish,
and afterwards every step must have exactly one `loss` point (the sink spooled what failed
and replayed it; SQL stores drop re-sent duplicates).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from chaos.ckpt_helpers import trials
from chaos.run_helpers import mlp_recipe, regimen, write_recipe

from conftest import free_port

pytestmark = pytest.mark.chaos


def _server(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("mlflow server did not come up in 120 s")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_training_survives_mlflow_outage(tmp_path: Path) -> None:
    steps = trials(ci=3000, full=20_000)  # long enough that the outage lands mid-run
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _server(tmp_path, port)
    driver = None
    try:
        recipe = mlp_recipe(steps=steps, every=0, tracking={"uri": uri})
        path = write_recipe(tmp_path / "r.yaml", recipe)
        driver = regimen(tmp_path, "run", str(path), "--json")
        client = mlflow.MlflowClient(uri)
        deadline, run_id = time.monotonic() + 240, None
        while time.monotonic() < deadline:  # wait for the first metrics to arrive
            time.sleep(1)
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                run_id = runs[0].info.run_id
                break
        assert run_id is not None, "no metrics reached the server"
        before = len(client.get_metric_history(run_id, "loss"))
        _kill(server)
        time.sleep(8)  # training goes on, the sink spools
        server = _server(tmp_path, port)
        out, err = driver.communicate(timeout=600)
        assert driver.returncode == 0, err[-3000:]
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["status"] == "FINISHED" and summary["steps"] == steps
        history = client.get_metric_history(run_id, "loss")
        per_step: dict[int, int] = {}
        for m in history:
            per_step[m.step] = per_step.get(m.step, 0) + 1
        missing = sorted(set(range(1, steps + 1)) - set(per_step))
        doubled = {s: n for s, n in per_step.items() if n != 1}
        print(f"\nCHAOS mlflow-outage steps={steps} before_kill={before} missing={len(missing)}")
        assert before < steps  # the outage really happened during training
        assert not missing, f"lost points for steps {missing[:20]}"
        assert not doubled, f"steps with !=1 point: {list(doubled.items())[:20]}"
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        _kill(server)
