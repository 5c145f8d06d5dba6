"""Ray Jobs submission without a cluster: token lookup, what ships, and auth error messages."""

from __future__ import annotations

import http.server
import threading
from collections.abc import AsyncIterator, Iterator
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


_VERSION = b'{"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}'


class _Refuse(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        auth = self.headers.get("Authorization")
        code = 401 if not auth else 403 if auth != "Bearer good" else 200
        body = {401: b"Unauthorized: Missing authentication token",
                403: b"Forbidden: Invalid authentication token", 200: _VERSION}[code]  # fmt: skip
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


class _StuckTailClient:
    """A JobSubmissionClient stand-in whose log tail, like Ray's, stays open for seconds
    after the job ended; the job is over after ``running`` state reads."""

    def __init__(self, running: int, log: str = "line 1\nline 2\nline 3\n") -> None:
        self.running, self.log, self.reads, self.closed = running, log, 0, False

    def get_job_info(self, job_id: str) -> object:
        from types import SimpleNamespace

        self.reads += 1
        return SimpleNamespace(status="RUNNING" if self.reads <= self.running else "SUCCEEDED")

    def get_job_logs(self, job_id: str) -> str:
        return self.log

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        import asyncio

        try:
            yield self.log[:7]  # "line 1\n"; the rest is never delivered by the tail
            await asyncio.sleep(3600)
        finally:
            self.closed = True


@pytest.mark.timeout(60)  # the old follow waited for the tail: forever here
def test_follow_ends_when_the_job_does_not_when_the_tail_closes(monkeypatch):
    """`submit --wait` / `logs --follow` return within a poll of the job's end, with the
    whole log exactly once, although Ray's tail has not closed (it does seconds later)."""
    import time

    fake = _StuckTailClient(running=3)
    monkeypatch.setattr(jobs, "client", lambda address: fake)
    t0 = time.monotonic()
    chunks = list(jobs.follow("http://x", "job-1", poll=0.05))
    assert time.monotonic() - t0 < 1.0
    assert "".join(chunks) == fake.log and chunks[0] == "line 1\n"
    assert fake.closed  # the tail's stream was shut, not left behind
    assert fake.reads == 4  # one check before tailing, then every poll until it ended


@pytest.mark.timeout(60)  # the old follow waited for the tail: forever here
def test_follow_gives_up_after_its_timeout(monkeypatch):
    import time

    fake = _StuckTailClient(running=10**9)
    monkeypatch.setattr(jobs, "client", lambda address: fake)
    t0 = time.monotonic()
    assert list(jobs.follow("http://x", "job-1", poll=0.05, timeout=0.3)) == ["line 1\n"]
    assert 0.3 <= time.monotonic() - t0 < 1.5


def test_one_client_per_dashboard_and_token(no_token, dashboard, monkeypatch):
    """Making a client asks the cluster for its version: `--wait` reads the job's state
    four times a second through one client, not a new one each time."""
    monkeypatch.setattr(jobs, "_CLIENTS", {})
    monkeypatch.setenv("RAY_AUTH_TOKEN", "good")
    made = []
    real = __import__("ray.job_submission", fromlist=["JobSubmissionClient"])

    class Counting(real.JobSubmissionClient):
        def __init__(self, *args, **kwargs):
            made.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(real, "JobSubmissionClient", Counting)
    assert jobs.client(dashboard) is jobs.client(dashboard + "/")
    assert len(made) == 1
    monkeypatch.setenv("RAY_AUTH_TOKEN", "other")
    with pytest.raises(jobs.ClusterError, match="rejected"):
        jobs.client(dashboard)  # another token is another client, and a refusal is not kept
    with pytest.raises(jobs.ClusterError):
        jobs.client(dashboard)
    assert len(made) == 3


def test_the_runtime_env_holds_only_what_the_job_needs(monkeypatch):
    """Every runtime_env field costs the job's start (a pip/uv/conda field builds an env on
    each node): a plain recipe ships its staged recipe and four variables, nothing else."""
    for name in jobs.FORWARDED_ENV:
        monkeypatch.delenv(name, raising=False)
    shipment, _, _ = jobs.prepare(TINY)
    try:
        env = shipment.runtime_env
        assert set(env) == {"working_dir", "env_vars"}
        assert [p.name for p in Path(env["working_dir"]).iterdir()] == ["recipe.yaml"]
        assert set(env["env_vars"]) == {
            "REGIMEN_JOB_ID", "RAY_OVERRIDE_JOB_RUNTIME_ENV", "RAY_JOB_STOP_WAIT_TIME_S",
        }  # fmt: skip
        assert "exec regimen run recipe.yaml --address auto" in shipment.entrypoint
    finally:
        import shutil

        shutil.rmtree(shipment.workdir)
