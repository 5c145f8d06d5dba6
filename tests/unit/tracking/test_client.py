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
