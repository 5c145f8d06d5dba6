"""The one MLflow client module: shared clients, sqlite turn-taking, URI pinning, errors."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow_turns import watched_sqlite_client

from orchestrator.errors import TrackingError
from orchestrator.tracking.client import (
    SQLITE_TURNS,
    TakingTurns,
    mlflow_client,
    mlflow_errors,
)
from orchestrator.tracking.runs import open_run, read_recipe_yaml


@pytest.fixture
def client(mlflow_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(mlflow_uri)


def test_one_client_per_uri_and_only_sqlite_takes_turns(mlflow_uri: str) -> None:
    assert mlflow_client(mlflow_uri) is mlflow_client(mlflow_uri)
    assert isinstance(mlflow_client(mlflow_uri), TakingTurns)
    server = "http://127.0.0.1:9"  # nothing is sent until a call is made
    assert mlflow_client(server) is mlflow_client(server)
    assert not isinstance(mlflow_client(server), TakingTurns)


def test_sqlite_calls_take_turns_and_all_land(mlflow_uri: str, client: Any, tmp_path: Path) -> None:
    """32 driver threads (a wide sweep) open runs on one sqlite store at once: at most 4
    MLflow calls are in flight together (below SQLAlchemy's pool of 5, so the pool never runs
    dry and times out), and every run arrives whole."""
    uri = mlflow_uri
    ids: list[str] = []

    def one(i: int) -> None:
        recipe = {"optimizer": {"lr": i}}
        run_id = open_run(
            uri,
            "exp",
            "job",
            artifact_location=str(tmp_path / "artifacts"),
            recipe=recipe,
            recipe_yaml=yaml.safe_dump(recipe),
        )
        ids.append(run_id)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    with watched_sqlite_client(uri) as watch:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert SQLITE_TURNS == 4
    assert len(ids) == 32 and 1 < watch.most <= 4
    for run_id in ids:
        run = client.get_run(run_id)
        assert (
            read_recipe_yaml(uri, run_id)
            == f"optimizer:\n  lr: {run.data.params['optimizer.lr']}\n"
        )


def test_mlflow_errors_name_the_uri_without_its_password() -> None:
    with pytest.raises(TrackingError) as err, mlflow_errors("tag run x", "http://u:pw@host"):
        raise ConnectionError("refused")
    text = str(err.value)
    assert "could not tag run x" in text and "ConnectionError: refused" in text
    assert "pw" not in text and "tracking.uri" in text


def test_new_sqlite_stores_copy_the_migrated_template(tmp_path: Path, monkeypatch) -> None:
    """The first new store is migrated by MLflow and kept (without its default experiment)
    as the template; the next new store copies it and MLflow migrates nothing."""
    import sqlite3

    import mlflow.store.db.utils as db_utils

    from orchestrator.tracking.client import seed_sqlite_store, store_template

    monkeypatch.setenv("REGIMEN_CACHE_DIR", str(tmp_path / "cache"))
    first = f"sqlite:///{tmp_path}/one/mlflow.db"
    (tmp_path / "one").mkdir()
    mlflow_client(first)
    template = store_template()
    assert template.is_file() and template.parent == tmp_path / "cache"
    with sqlite3.connect(template) as db:
        assert db.execute("SELECT COUNT(*) FROM experiments").fetchone()[0] == 0

    def no_migrations(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a seeded store must not be migrated")

    monkeypatch.setattr(db_utils, "_initialize_tables", no_migrations)
    second = f"sqlite:///{tmp_path}/two/mlflow.db"
    client = mlflow_client(second)
    assert (tmp_path / "two/mlflow.db").is_file()
    assert client.get_experiment("0").name == "Default"  # made by MLflow on open
    run = open_run(second, "exp", "r", recipe={"a": 1}, recipe_yaml="a: 1\n")
    assert read_recipe_yaml(second, run) == "a: 1\n"
    assert seed_sqlite_store(second) is None  # an existing store is never replaced
    assert seed_sqlite_store("http://127.0.0.1:9") is None
    assert seed_sqlite_store("sqlite:///:memory:") is None


def test_a_store_with_runs_never_becomes_the_template(tmp_path: Path, monkeypatch) -> None:
    from orchestrator.tracking.client import save_store_template, store_template

    monkeypatch.setenv("REGIMEN_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow_client(uri)
    store_template().unlink()  # kept by the first open; now the store gets a run
    client.create_run(client.create_experiment("e"))
    save_store_template(uri)
    assert not store_template().exists()


def test_opening_the_store_in_the_background_reports_its_error(tmp_path: Path) -> None:
    from orchestrator.tracking.runs import StoreOpening

    (tmp_path / "file").write_text("")  # a file where the store's directory should be
    opening = StoreOpening(f"sqlite:///{tmp_path}/file/mlflow.db")
    with pytest.raises(TrackingError, match="open the tracking store"):
        opening.wait()
    good = StoreOpening(f"sqlite:///{tmp_path}/ok.db")
    good.wait()
    assert good.ready_at is not None and good.ready_at >= good.began_at
