"""Driver-side run lifecycle against a real MLflow sqlite store."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.errors import TrackingError
from orchestrator.tracking.runs import (
    TOO_LONG,
    end_run,
    flatten_params,
    log_event,
    log_summary,
    open_run,
    read_events,
    read_recipe_yaml,
    recipe_sha256,
    set_tags,
)

RECIPE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "model": {"kind": "hf_config", "config": {"hidden_size": 32, "num_hidden_layers": 2}},
    "optimizer": {"name": "adamw", "lr": 0.003, "betas": [0.9, 0.95]},
    "data": {"kind": "stdlib_bytes", "prompt": "x" * 10_000, "shuffle": True, "path": None},
    "techniques": {},
}


@pytest.fixture
def uri(mlflow_uri: str) -> str:
    """A fresh MLflow sqlite store (tests/conftest.py)."""
    return mlflow_uri


@pytest.fixture
def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _open(uri: str, tmp_path: Path, name: str = "job", **kw: Any) -> str:
    return open_run(uri, "exp", name, artifact_location=str(tmp_path / "artifacts"), **kw)


def test_flatten_params_shapes() -> None:
    params = flatten_params(RECIPE)
    assert params["model.config.hidden_size"] == "32"
    assert params["optimizer.lr"] == "0.003"
    assert json.loads(params["optimizer.betas"]) == [0.9, 0.95]
    assert params["data.shuffle"] == "true"
    assert params["data.path"] == "null"
    assert params["data.prompt"] == TOO_LONG
    assert params["techniques"] == "{}"
    assert flatten_params({"a": {"b/c d@e": 1}}) == {"a.b_c d_e": "1"}


def test_flatten_params_bounds_key_count() -> None:
    params = flatten_params({f"k{i}": i for i in range(50)}, max_params=10)
    assert len(params) == 10
    assert params["regimen.params_omitted"].startswith("41 ")


def test_open_run_logs_params_tags_and_recipe(uri: str, client: Any, tmp_path: Path) -> None:
    text = yaml.safe_dump(RECIPE, sort_keys=False)
    run_id = _open(uri, tmp_path, recipe=RECIPE, recipe_yaml=text, tags={"team": "nlp"})
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.info.run_name == "job"
    assert run.info.artifact_uri.startswith(str(tmp_path / "artifacts"))
    assert run.data.params == flatten_params(RECIPE)
    tags = run.data.tags
    assert tags["team"] == "nlp"
    assert tags["regimen.recipe_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert tags["regimen.recipe_sha256"] == recipe_sha256(text)
    assert tags["regimen.python"].count(".") == 2
    assert tags["regimen.versions.mlflow"]
    assert tags["regimen.host"] == socket.gethostname()
    assert read_recipe_yaml(uri, run_id) == text


def test_open_run_many_params_are_chunked(uri: str, client: Any, tmp_path: Path) -> None:
    recipe = {"grid": {f"p{i:03d}": i for i in range(250)}}
    run_id = _open(uri, tmp_path, recipe=recipe)
    params = client.get_run(run_id).data.params
    assert len(params) == 250 and params["grid.p249"] == "249"
    assert yaml.safe_load(read_recipe_yaml(uri, run_id)) == recipe  # dumped when no text given


def test_parent_and_child_runs(uri: str, client: Any, tmp_path: Path) -> None:
    parent = _open(uri, tmp_path, "sweep", tags={"regimen.role": "sweep"})
    kids = [_open(uri, tmp_path, f"v{i}", recipe=RECIPE, parent_run_id=parent) for i in range(2)]
    exp = client.get_experiment_by_name("exp")
    found = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_id for r in found) == sorted(kids)
    assert "mlflow.parentRunId" not in client.get_run(parent).data.tags


def test_end_run_statuses_and_idempotence(uri: str, client: Any, tmp_path: Path) -> None:
    ids = {s: _open(uri, tmp_path, s) for s in ("FINISHED", "FAILED", "KILLED")}
    for status, run_id in ids.items():
        end_run(uri, run_id, status, reason=f"because {status}")  # type: ignore[arg-type]
    for status, run_id in ids.items():
        run = client.get_run(run_id)
        assert run.info.status == status and run.info.end_time
        assert run.data.tags["regimen.end_reason"] == f"because {status}"
    end_run(uri, ids["FINISHED"], "FAILED", reason="late")  # first end wins
    assert client.get_run(ids["FINISHED"]).info.status == "FINISHED"
    assert client.get_run(ids["FINISHED"]).data.tags["regimen.end_reason"] == "because FINISHED"
    with pytest.raises(ValueError):
        end_run(uri, ids["FAILED"], "RUNNING")  # type: ignore[arg-type]
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert all(r.info.status != "RUNNING" for r in runs)


def test_summary_tags_and_events(uri: str, client: Any, tmp_path: Path) -> None:
    run_id = _open(uri, tmp_path)
    log_summary(uri, run_id, {"final_loss": 1.25, "steps": 8}, tags={"regimen.checkpoint": "c8"})
    set_tags(uri, run_id, {"regimen.run_dir": "/runs/x", "hf_token": "hf_zzz"})
    log_event(uri, run_id, "job_start", 0, {"attempt": 1})
    log_event(uri, run_id, "resume", 4, {"from_step": 4})
    run = client.get_run(run_id)
    assert run.data.metrics == {"final_loss": 1.25, "steps": 8.0}
    assert run.data.tags["regimen.checkpoint"] == "c8"
    assert run.data.tags["regimen.run_dir"] == "/runs/x"
    assert run.data.tags["hf_token"] == "***"
    events = read_events(uri, run_id)
    assert [(e["kind"], e["step"]) for e in events] == [("job_start", 0), ("resume", 4)]
    assert events[1]["from_step"] == 4 and isinstance(events[1]["time"], float)


def test_missing_recipe_artifact_is_a_tracking_error(uri: str, tmp_path: Path) -> None:
    run_id = _open(uri, tmp_path)
    with pytest.raises(TrackingError, match=r"no recipe\.yaml"):
        read_recipe_yaml(uri, run_id)


def test_unreachable_server_raises_tracking_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrackingError, match="tracking server is running"):
        open_run(f"http://127.0.0.1:{port}", "exp", "job", recipe=RECIPE)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_provenance(
    uri: str, client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    monkeypatch.chdir(repo)
    tags = client.get_run(_open(uri, tmp_path)).data.tags
    assert tags["regimen.git_commit"] == head.strip()
    assert tags["regimen.git_dirty"] == "false"
    (repo / "f.txt").write_text("b")
    assert client.get_run(_open(uri, tmp_path)).data.tags["regimen.git_dirty"] == "true"
