"""Secrets as ``${env:NAME}`` references: resolved at load (driver and worker), stored and
shipped as references, resolved again on resume; a masked value is never used."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import TINY_RECIPE
from orchestrator.control.controller import open_job_run
from orchestrator.control.resume import recipe_to_continue
from orchestrator.envrefs import (
    references,
    resolve_env_refs,
    resolve_pinned,
    restore_refs,
)
from orchestrator.errors import RecipeError, UsageError
from orchestrator.recipe.jobspec import JobSpec
from orchestrator.recipe.loader import load_recipe, load_recipe_text
from orchestrator.tracking.client import mlflow_client
from orchestrator.tracking.redact import MASK, redact, redact_string
from orchestrator.tracking.runs import open_run, read_recipe_yaml

TOKEN = "tok-VALUE-3f9a1c7e5b2d"  # MY_TOKEN: a secret-looking name under a secret key
PASSWORD = "pw-VALUE-81c0d2e4f6a9"  # DB_PW_PLAIN: a plain name inside a URL, plain key
ENDPOINT = "https://me:${env:DB_PW_PLAIN}@db.example/x"


def _write(tmp_path: Path, mlflow_uri: str, **tags: Any) -> Path:
    data = {
        **TINY_RECIPE,
        "checkpoint": {**TINY_RECIPE["checkpoint"], "storage": str(tmp_path / "runs")},
        "tracking": {
            "uri": mlflow_uri,
            "experiment": "secrets",
            "tags": {"token": "${env:MY_TOKEN}", "endpoint": ENDPOINT, **tags},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_TOKEN", TOKEN)
    monkeypatch.setenv("DB_PW_PLAIN", PASSWORD)


def _store_text(client: Any, run_id: str, db: Path) -> str:
    """Every param, tag and artifact text of the run, and the raw bytes of the store."""
    run = client.get_run(run_id)
    parts = [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
    pending = [""]
    while pending:
        for item in client.list_artifacts(run_id, pending.pop() or None):
            if item.is_dir:
                pending.append(item.path)
            else:
                local = client.download_artifacts(run_id, item.path)
                parts.append(Path(local).read_text(errors="replace"))
    parts.append(db.read_bytes().decode("latin-1"))
    return "\n".join(parts)


def test_resolver_pieces() -> None:
    data = {"a": {"t": "${env:X}", "u": "h://u:${env:Y}@h", "n": 3}, "l": ["${env:X}"]}
    env = {"X": "xv", "Y": "yv"}
    assert references(data) == {"a.t": "${env:X}", "a.u": "h://u:${env:Y}@h", "l.0": "${env:X}"}
    resolved, pinned = resolve_pinned(data, env=env)
    assert resolved == resolve_env_refs(data, env=env)
    assert resolved == {"a": {"t": "xv", "u": "h://u:yv@h", "n": 3}, "l": ["xv"]}
    assert data["a"]["t"] == "${env:X}"  # the input is not changed
    assert restore_refs(resolved, pinned) == data
    changed = {**resolved, "a": {**resolved["a"], "t": "other"}}
    assert restore_refs(changed, pinned)["a"]["t"] == "other"
    with pytest.raises(KeyError, match=r"a\.t: \$\{env:X\} is not set: export X=\.\.\."):
        resolve_env_refs(data, env={"Y": "yv"})


def test_missing_variable_is_a_located_error(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, mlflow_uri)
    monkeypatch.delenv("MY_TOKEN", raising=False)
    monkeypatch.setenv("DB_PW_PLAIN", PASSWORD)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "token:" in t)
    assert err.value.exit_code == 2
    assert str(err.value) == (
        f"{path}:{line}: tracking.tags.token: ${{env:MY_TOKEN}} is not set: "
        "export MY_TOKEN=... before running"
    )


def test_values_reach_the_recipe_but_never_mlflow_workers_yaml_or_logs(
    tmp_path: Path, mlflow_uri: str, secret_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    loaded = load_recipe(_write(tmp_path, mlflow_uri))
    tags = loaded.recipe.tracking.tags
    assert tags["token"] == TOKEN  # resolved on the driver
    assert tags["endpoint"] == f"https://me:{PASSWORD}@db.example/x"
    spec = JobSpec.of("tiny", loaded.recipe)
    run_id, run_dir = open_job_run(spec)
    config = spec.worker_config(run_dir, run_id)
    shipped = repr(config) + loaded.yaml_text
    stored = _store_text(mlflow_client(spec.tracking_uri), run_id, tmp_path / "mlflow.db")
    for where, text in {"worker config": shipped, "MLflow": stored, "logs": caplog.text}.items():
        assert TOKEN not in text, where
        assert PASSWORD not in text, where
    for text in (shipped, stored):  # the references themselves are kept, for workers and resume
        assert "${env:MY_TOKEN}" in text
        assert ENDPOINT in text
    run = mlflow_client(spec.tracking_uri).get_run(run_id)
    assert run.data.tags["token"] == "${env:MY_TOKEN}"
    assert run.data.params["tracking.tags.endpoint"] == ENDPOINT
    # each worker resolves the references it received from its own environment
    worker = load_recipe_text(config["recipe_yaml"], name="recipe.yaml")
    assert worker.tracking.tags["token"] == TOKEN
    assert worker.tracking.tags["endpoint"] == f"https://me:{PASSWORD}@db.example/x"
    assert resolve_env_refs(config["tracking_uri"]) == spec.tracking_uri


def test_worker_without_the_variable_refuses_the_recipe(
    tmp_path: Path, mlflow_uri: str, secret_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = JobSpec.of("tiny", load_recipe(_write(tmp_path, mlflow_uri)).recipe)
    monkeypatch.delenv("MY_TOKEN")
    with pytest.raises(RecipeError, match=r"tracking\.tags\.token: \$\{env:MY_TOKEN\} is not set"):
        load_recipe_text(spec.recipe_yaml, name="recipe.yaml")


def test_resume_resolves_references_again(
    tmp_path: Path, mlflow_uri: str, secret_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = JobSpec.of("tiny", load_recipe(_write(tmp_path, mlflow_uri)).recipe)
    run_id, _ = open_job_run(spec)
    monkeypatch.setenv("MY_TOKEN", "tok-ROTATED-0000000000")
    recipe = recipe_to_continue(read_recipe_yaml(mlflow_uri, run_id), run_id)
    assert recipe.tracking.tags["token"] == "tok-ROTATED-0000000000"
    assert recipe.tracking.tags["endpoint"] == f"https://me:{PASSWORD}@db.example/x"
    monkeypatch.delenv("MY_TOKEN")
    with pytest.raises(RecipeError, match=r"export MY_TOKEN=\.\.\. before running"):
        recipe_to_continue(read_recipe_yaml(mlflow_uri, run_id), run_id)


@pytest.mark.parametrize(
    ("key", "value"),
    [("token", "hunter2-in-the-clear"), ("endpoint", "https://me:hunter2-pw@db.example/x")],
)
def test_resume_refuses_a_masked_value(
    tmp_path: Path, mlflow_uri: str, key: str, value: str
) -> None:
    """A run recorded before references stored its secret as ``***``: resume must not use it."""
    data = {**TINY_RECIPE, "tracking": {"uri": mlflow_uri, "tags": {key: value}}}
    old = open_run(
        mlflow_uri,
        "secrets",
        "old",
        recipe_yaml=yaml.safe_dump(data, sort_keys=False),
        artifact_location=str(tmp_path / "artifacts"),
    )
    stored = read_recipe_yaml(mlflow_uri, old)
    assert "***" in stored and "hunter2" not in stored
    with pytest.raises(UsageError) as err:
        recipe_to_continue(stored, old)
    message = str(err.value)
    assert err.value.exit_code == 2
    assert f"tracking.tags.{key}" in message
    assert "'***'" in message
    assert f"`{key}: ${{env:NAME}}`" in message and "export NAME=" in message


def test_redaction_keeps_references_and_scrubs_what_they_resolved_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert redact({"token": "${env:MY_TOKEN}", "password": "x-${env:P}"}) == {
        "token": "${env:MY_TOKEN}",  # a reference hides nothing: resume needs it
        "password": MASK,  # text around it may be a secret
    }
    assert redact_string(ENDPOINT) == ENDPOINT
    assert redact_string("https://h/x?access_token=${env:T}") == "https://h/x?access_token=${env:T}"
    assert redact_string("https://me:pw-in-the-clear@h/x") == f"https://me:{MASK}@h/x"
    value = "plain-VALUE-5e6f7a8b9c"
    monkeypatch.setenv("REDACT_TEST_PLAIN", value)  # a name that does not look secret
    assert value in redact_string(f"connect with {value}")
    resolve_env_refs({"model": {"config": {"endpoint": "h://me:${env:REDACT_TEST_PLAIN}@h"}}})
    assert redact_string(f"connect with {value}") == f"connect with {MASK}"


def test_a_submitted_job_ships_the_reference(
    tmp_path: Path, mlflow_uri: str, secret_env: None
) -> None:
    """`regimen submit` stages the recipe for the Ray job (and KubeRay's ConfigMap): its
    text and the job's runtime_env (Ray job metadata) hold the reference, not the value."""
    from orchestrator.cluster.jobs import prepare
    from orchestrator.cluster.manifests import from_recipe_file

    path = _write(tmp_path, mlflow_uri)
    shipment, _, _ = prepare(path)
    staged = (shipment.workdir / "recipe.yaml").read_text()
    shipped = staged + repr(shipment.runtime_env) + shipment.entrypoint
    shipped += from_recipe_file(str(path))
    assert TOKEN not in shipped and PASSWORD not in shipped
    assert "${env:MY_TOKEN}" in staged and ENDPOINT in staged
