"""Ray Jobs submission without a cluster: token lookup, what ships, and auth error messages."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from orchestrator.cluster import jobs
from orchestrator.recipe.loader import load_recipe

TINY = Path(__file__).parents[2] / "integration" / "data" / "tiny.yaml"


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_token_precedence(no_token, monkeypatch):
    assert jobs.auth_token() is None
    (no_token / ".ray").mkdir()
    (no_token / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs.auth_token() == "from-home"
    (no_token / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(no_token / "t"))
    assert jobs.auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.auth_token() == "from-env"


def test_prepare_ships_the_resolved_recipe(tmp_path):
    shipment, variants, warnings = jobs.prepare(TINY, ["optimizer.lr=0.01"])
    try:
        shipped = yaml.safe_load((shipment.workdir / "recipe.yaml").read_text())
        assert shipped == yaml.safe_load(load_recipe(TINY, ["optimizer.lr=0.01"]).yaml_text)
        assert shipped["optimizer"]["lr"] == 0.01 and len(variants) == 1
        assert "regimen run recipe.yaml --address auto" in shipment.entrypoint
        env = shipment.runtime_env["env_vars"]
        assert env["REGIMEN_JOB_ID"] == shipment.job_id
        assert shipment.job_id.startswith("regimen-tiny-cluster-")
        assert "py_modules" not in shipment.runtime_env
        assert any("tracking.uri" in w for w in warnings)
        assert any("checkpoint.storage" in w for w in warnings)
    finally:
        import shutil

        shutil.rmtree(shipment.workdir)


def test_factory_code_travels_as_py_modules(tmp_path, monkeypatch):
    pkg = tmp_path / "mymodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("def build(**kw):\n    raise NotImplementedError\n")
    recipe = yaml.safe_load(TINY.read_text())
    recipe["model"] = {"kind": "factory", "factory": "mymodels.nets:build"}
    recipe["tracking"]["uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    recipe["checkpoint"]["storage"] = str(tmp_path / "runs")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path.parent)
    shipment, _, warnings = jobs.prepare(path)
    assert shipment.runtime_env["py_modules"] == [str(pkg.resolve())]
    assert warnings == []
    recipe["model"]["factory"] = "nosuchpkg_xyz.nets:build"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(jobs.UsageError, match="nosuchpkg_xyz"):
        jobs.prepare(path)


class _Refuse(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        auth = self.headers.get("Authorization")
        code = 401 if not auth else 403 if auth != "Bearer good" else 200
        body = {401: b"Unauthorized: Missing authentication token",
                403: b"Forbidden: Invalid authentication token", 200: b"{}"}[code]  # fmt: skip
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def dashboard() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_missing_token_is_a_clear_exit_2(no_token, dashboard):
    with pytest.raises(jobs.ClusterError) as info:
        jobs.client(dashboard)
    assert info.value.exit_code == 2
    assert "requires an auth token" in str(info.value) and "RAY_AUTH_TOKEN" in str(info.value)


def test_wrong_token_is_a_clear_exit_2(no_token, dashboard, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "bad")
    with pytest.raises(jobs.ClusterError) as info:
        jobs.client(dashboard)
    assert info.value.exit_code == 2 and "rejected the auth token" in str(info.value)


def test_unreachable_dashboard(no_token, monkeypatch):
    with pytest.raises(jobs.ClusterError, match="cannot reach the Ray dashboard"):
        jobs.client("http://127.0.0.1:9")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(jobs.ClusterError, match="no cluster address"):
        jobs.client(None)


@pytest.mark.parametrize(
    ("job_status", "expected"),
    [("STOPPED", "KILLED"), ("FAILED", "FAILED"), ("RUNNING", "RUNNING")],
)
def test_runs_left_open_by_an_ended_job_are_closed(tmp_path, job_status, expected):
    """A driver SIGKILLed after `regimen stop` cannot end its runs; the next listing does."""
    from types import SimpleNamespace

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("orphans")
    run = client.create_run(exp, tags={jobs.JOB_TAG: "job-1"})
    details = SimpleNamespace(
        status=job_status,
        submission_id="job-1",
        metadata={"regimen.tracking_uri": uri, "regimen.experiment": "orphans"},
    )
    rows = jobs.mlflow_runs(details)
    assert [r["status"] for r in rows] == [expected]
    stored = client.get_run(run.info.run_id)
    assert stored.info.status == expected
    if expected != "RUNNING":
        assert "job-1 ended " + job_status in stored.data.tags["regimen.end_reason"]


def test_job_listings_on_sqlite_take_turns_and_all_land(mlflow_uri):
    """Listing a job's runs (`regimen status`) uses the shared client: many listings at once
    wait for a turn on a sqlite store instead of draining its pool, and every one lands."""
    import threading
    from types import SimpleNamespace

    from mlflow import MlflowClient
    from mlflow_turns import watched_sqlite_client

    from orchestrator.tracking.client import SQLITE_TURNS

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("listed")
    run = client.create_run(exp, tags={jobs.JOB_TAG: "job-1"})
    details = SimpleNamespace(
        status="RUNNING",
        submission_id="job-1",
        metadata={"regimen.tracking_uri": mlflow_uri, "regimen.experiment": "listed"},
    )
    listed: list[list[str]] = []

    def one() -> None:
        listed.append([r["run_id"] for r in jobs.mlflow_runs(details)])

    threads = [threading.Thread(target=one) for _ in range(24)]
    with watched_sqlite_client(mlflow_uri) as watch:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert listed == [[run.info.run_id]] * 24
    assert watch.calls >= 2 * 24 and 1 < watch.most <= SQLITE_TURNS


@pytest.mark.parametrize(("verbose", "tail"), [(False, "--json"), (True, "--json --verbose")])
def test_submit_verbose_makes_the_jobs_regimen_run_verbose(monkeypatch, verbose, tail):
    """The job's own `regimen run` is quiet (its log keeps Ray's, MLflow's lines) unless
    `regimen submit --verbose`."""
    sent: dict[str, str] = {}

    class FakeClient:
        def submit_job(self, *, entrypoint: str, **_: object) -> str:
            sent["entrypoint"] = entrypoint
            return "job-1"

    monkeypatch.setattr(jobs, "client", lambda address: FakeClient())
    assert jobs.submit("http://head:8265", TINY, verbose=verbose)[0] == "job-1"
    assert sent["entrypoint"].endswith(f"regimen run recipe.yaml --address auto {tail}")
