"""`regimen audit` against a real `mlflow server --app-name basic-auth` on loopback.

Runs are real (`regimen run` / `resume` subprocesses: embedded Ray, DeepSpeed on CPU, gloo)
and tiny. Covered: the lineage of a run with an automatic rollback, whose driver is
SIGKILLed, reconciled, then resumed; `--plot` of that lineage; a two-variant sweep trained
through a proxy that goes down mid-run (no metric point lost) and compared.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

from conftest import REPO, TINY_RECIPE, free_port, kill_session, wait_for

pytestmark = pytest.mark.integration

PASSWORD = "audit-Admin-pw-7731"
AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{db}
admin_username = admin
admin_password = {pw}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
"""


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A basic-auth MLflow server (sqlite + local artifacts) and client credentials in env."""
    pytest.importorskip("flask_wtf", reason="basic auth needs mlflow[auth] (Flask-WTF)")
    tmp = tmp_path_factory.mktemp("mlflow-server")
    ini = tmp / "auth.ini"
    ini.write_text(AUTH_INI.format(db=tmp / "auth.db", pw=PASSWORD))
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini)}
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = "regimen-test-secret"
    log = open(tmp / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
            "--artifacts-destination", str(tmp / "artifacts"),
        ],
        cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD)
    try:
        _wait_http(f"{uri}/health", 150)
        yield {"uri": uri, "tmp": tmp}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Proxy:
    """A TCP forwarder to the server that can be taken down (connections refused/cut)."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.down = False
        self.refused = 0
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.down:
                self.refused += 1
                conn.close()
                continue
            try:
                up = socket.create_connection(self.target)
            except OSError:
                conn.close()
                continue
            self.open += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def set_down(self, down: bool) -> None:
        self.down = down
        if down:  # cut the kept-alive connections too
            for s in self.open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self.open = []


def _recipe(tmp: Path, uri: str, experiment: str, **changes: Any) -> Path:
    r = json.loads(json.dumps(TINY_RECIPE))
    r.update(
        resources={"workers": 1},
        tracking={"uri": uri, "experiment": experiment},
        checkpoint={"every": 2, "keep": 0, "storage": "./runs"},
    )
    r.update(changes)
    path = tmp / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _regimen(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


def _done(proc: subprocess.Popen[str], timeout: float = 300) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    return json.loads(out.strip().splitlines()[-1])


def _reached(tmp: Path, step: int) -> bool:
    """A committed checkpoint at or after ``step`` exists (dirs are ``step-00000014``)."""
    done = (p.parent.name for p in (tmp / "runs").glob("*/checkpoints/step-*/manifest.json"))
    return any(int(name.split("-")[1]) >= step for name in done)


def test_rollback_kill_reconcile_resume_lineage_and_plot(
    server: dict[str, Any], tmp_path: Path
) -> None:
    uri = server["uri"]
    guard = {"window": 16, "min_history": 4, "patience": 1, "good_after": 1, "skip_batches": 2}
    recipe = _recipe(
        tmp_path, uri, "lineage", schedule={"steps": 80, "micro_batch_size": 2},
        stability={**guard, "grad_norm_zscore": False},
        techniques={"fault_injection": {"spike_at_step": 6, "spike_factor": 100.0}},
    )  # fmt: skip
    driver = _regimen(tmp_path, "run", recipe.name, "--json")
    client = mlflow.MlflowClient(uri)

    def segment_and_progress() -> Any:
        if not _reached(tmp_path, 10):
            return None
        exp = client.get_experiment_by_name("lineage")
        segs = client.search_runs([exp.experiment_id], "tags.`regimen.role` = 'segment'")
        return segs[0] if segs else None

    seg = wait_for(segment_and_progress, 240, "a rollback segment and step 10")
    kill_session(driver)  # the driver, its embedded Ray and the workers die at once
    job_id = seg.data.tags["regimen.parent_run_id"]
    assert client.get_run(job_id).info.status == "RUNNING"  # stale

    audit = _regimen(tmp_path, "audit", "--reconcile", "--experiment", "lineage", "--json",
                     "--tracking-uri", uri)  # fmt: skip
    ended = {r["run_id"]: r for r in _done(audit, 120)["reconciled"]}
    assert ended[job_id]["ended"] and "driver process" in ended[job_id]["reason"]
    job = client.get_run(job_id)
    assert job.info.status == "KILLED" and job.data.tags["regimen.end_reason"].startswith(
        "driver gone"
    )
    # the segment is KILLED with its job (FINISHED if the worker ended just before the kill)
    assert client.get_run(seg.info.run_id).info.status in ("KILLED", "FINISHED")
    exp_id = job.info.experiment_id
    assert not client.search_runs([exp_id], "attributes.status = 'RUNNING'")

    resumed = _done(_regimen(tmp_path, "resume", job_id, "--json", "--tracking-uri", uri))
    assert resumed["status"] == "FINISHED" and resumed["steps"] == 80

    png = tmp_path / "lineage.png"
    rep = _done(_regimen(tmp_path, "audit", resumed["run_id"], "--json", "--plot", str(png),
                         "--tracking-uri", uri), 120)  # fmt: skip
    tree = rep["lineage"]
    assert tree["run_id"] == job_id and tree["status"] == "KILLED"
    kinds = [(c["kind"], c["status"]) for c in tree["children"]]
    assert kinds[-1] == ("resume", "FINISHED") and {k for k, _ in kinds[:-1]} == {"rollback"}
    assert tree["children"][0]["restored_step"] < 7 <= tree["children"][-1]["restored_step"]
    events = [e["kind"] for e in rep["events"]]
    assert "spike" in events and "rollback" in events and "resume" in events
    assert rep["metrics"]["steps"] == 80 and rep["provenance"]["regimen.world_size"] == "1"
    assert rep["datasets"] and len(rep["datasets"][0]["digest"]) == 32
    assert rep["ds_config"]["train_micro_batch_size_per_gpu"] == 2
    assert rep["checkpoints"] and rep["checkpoints"][-1]["step"] == 80
    assert len(rep["plot"]["lines"]) == 1 + len(kinds)  # one line per run of the lineage
    assert rep["plot"]["markers"].get("rollback") == len(kinds) - 1
    assert png.stat().st_size == rep["plot"]["size_bytes"] > 10_000


def test_sweep_through_an_outage_loses_no_metric_then_compare(
    server: dict[str, Any], tmp_path: Path
) -> None:
    proxy = Proxy(int(server["uri"].rsplit(":", 1)[1]))
    uri = f"http://127.0.0.1:{proxy.port}"
    steps = 40
    recipe = _recipe(
        tmp_path, uri, "sweep", schedule={"steps": steps, "micro_batch_size": 2},
        checkpoint={"every": 5, "keep": 0, "storage": "./runs"},
        sweep={"grid": {"optimizer.lr": [0.001, 0.004]}, "max_concurrent": 1},
    )  # fmt: skip
    driver = _regimen(tmp_path, "run", recipe.name, "--json")
    wait_for(lambda: _reached(tmp_path, 5), 240, "step 5")
    proxy.set_down(True)
    # until step 20 and a call refused: on a fast machine steps 5-20 can pass between two
    # of the sink's sends, and an outage no call met would test nothing
    reached = lambda: _reached(tmp_path, 20) and proxy.refused > 0  # noqa: E731
    wait_for(reached, 120, "step 20 and a refused MLflow call in the outage")
    proxy.set_down(False)
    summary = _done(driver)
    assert proxy.refused > 0  # the outage was real
    variants = summary["variants"]
    assert [v["status"] for v in variants] == ["FINISHED", "FINISHED"]

    client = mlflow.MlflowClient(server["uri"])  # straight to the server
    for v in variants:
        history = client.get_metric_history(v["run_id"], "loss")
        per_step: dict[int, int] = {}
        for m in history:
            per_step[m.step] = per_step.get(m.step, 0) + 1
        assert per_step == {s: 1 for s in range(1, steps + 1)}, v["run_id"]

    a, b = (v["run_id"] for v in variants)
    png = tmp_path / "compare.png"
    cmp = _done(_regimen(tmp_path, "audit", "--compare", a, b, "--json", "--plot", str(png),
                         "--tracking-uri", server["uri"]), 120)  # fmt: skip
    assert cmp["recipe_diff"]["optimizer.lr"] == {a: "0.001", b: "0.004"}
    assert all(k in ("optimizer.lr", "name", "tracking.run_name") for k in cmp["recipe_diff"])
    assert set(cmp["metrics"]["final_loss"]) == {a, b} and len(cmp["plot"]["lines"]) == 2
    table = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "audit", "--experiment", "sweep", "--csv",
         "--sort", "final_loss", "--tracking-uri", server["uri"]],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr[-2000:]
    lines = table.stdout.strip().splitlines()
    assert "optimizer.lr" in lines[0].split(",") and len(lines) == 3  # header + 2 jobs
