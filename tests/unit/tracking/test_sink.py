"""MetricSink: exact delivery, O(1) log(), spooling through outages, crash replay."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from orchestrator.tracking.runs import open_run, read_events
from orchestrator.tracking.sink import MetricSink, replay_spool

KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "train/acc")


@pytest.fixture
def uri(mlflow_uri: str) -> str:
    """A fresh MLflow sqlite store (tests/conftest.py)."""
    return mlflow_uri


@pytest.fixture
def run_id(uri: str, tmp_path: Path) -> str:
    return open_run(uri, "sink", "job", artifact_location=str(tmp_path / "artifacts"))


def _steps(uri: str, run_id: str, key: str) -> Counter[int]:
    from mlflow import MlflowClient

    return Counter(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Counting:
    """A stand-in MLflow client that only counts what it is sent."""

    def __init__(self) -> None:
        self.points, self.sizes = 0, list[int]()

    def log_batch(self, run_id: str, metrics: list[Any], **kwargs: Any) -> None:
        self.points += len(metrics)
        self.sizes.append(len(metrics))

    def log_text(self, *args: Any) -> None:
        pass


class Flaky:
    """A client whose first ``fails`` log_batch calls raise, as during a server outage."""

    def __init__(self, real: Any, fails: int):
        self.real, self.fails, self.calls = real, fails, 0

    def log_batch(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.fails > 0:
            self.fails -= 1
            raise ConnectionError("server down")
        return self.real.log_batch(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_every_point_arrives_once(uri: str, run_id: str, tmp_path: Path) -> None:
    sink = MetricSink(uri, run_id, flush_interval_s=0.2, spool_dir=tmp_path / "spool")
    for step in range(400):
        sink.log(step, {k: step * 0.5 + i for i, k in enumerate(KEYS)})
    sink.close()
    sink.close()  # idempotent
    assert sink.pending == 0
    for key in KEYS:
        assert _steps(uri, run_id, key) == Counter(range(400))
    from mlflow import MlflowClient

    hist = MlflowClient(uri).get_metric_history(run_id, "grad_norm")
    assert sorted((m.step, m.value) for m in hist)[:2] == [(0, 2.0), (1, 2.5)]


def test_log_is_cheap(tmp_path: Path) -> None:
    sink = MetricSink("sqlite:///unused.db", "r1", spool_dir=tmp_path / "spool")
    sink._client = counter = Counting()  # the sender runs for real; only MLflow is stubbed
    sink.log(-1, {"loss": 0.0})
    assert sink.flush(timeout_s=10)
    n = 10_000
    start = time.perf_counter()
    for step in range(n):
        sink.log(step, {"loss": 1.0 / (step + 1), "lr": 1e-3, "grad_norm": 0.5})
    mean_us = (time.perf_counter() - start) / n * 1e6
    sink.close()
    print(f"MetricSink.log mean cost: {mean_us:.2f} us/call (3 metrics)")
    assert mean_us < 50
    assert counter.points == 3 * n + 1 and max(counter.sizes) <= 1000


def test_outage_then_recovery(
    uri: str, run_id: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow import MlflowClient

    sink = MetricSink(uri, run_id, flush_interval_s=60, spool_dir=tmp_path / "spool")
    sink._client = flaky = Flaky(MlflowClient(uri), fails=3)
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking.sink"):
        for step in range(100):
            sink.log(step, {"loss": float(step), "lr": 1e-3})
        assert sink.flush(timeout_s=9)
        for step in range(100, 150):  # after recovery, the normal path
            sink.log(step, {"loss": float(step), "lr": 1e-3})
        sink.close()
    warnings = [r for r in caplog.records if "spooling metrics" in r.getMessage()]
    assert len(warnings) == 1 and flaky.calls >= 4
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert _steps(uri, run_id, "loss") == Counter(range(150))
    assert _steps(uri, run_id, "lr") == Counter(range(150))
    assert sink.spool_path.stat().st_size == 0


def test_unreachable_server_spools_then_replays(
    uri: str,
    run_id: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    dead = f"http://127.0.0.1:{_closed_port()}"
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking.sink"):
        sink = MetricSink(dead, "deadrun", flush_interval_s=0.1, spool_dir=tmp_path / "spool")
        for step in range(300):
            sink.log(step, {"loss": float(step), "acc": step / 300})
        sink.event("rollback", 120, to_step=100, api_key="sk-should-not-leak")
        assert not sink.flush(timeout_s=2.5)
        sink.close(timeout_s=0.5)
    assert len([r for r in caplog.records if "spooling metrics" in r.getMessage()]) == 1
    assert sink.pending == 600
    lines = [json.loads(x) for x in sink.spool_path.read_text().splitlines()]
    assert sorted(rec["step"] for rec in lines) == list(range(300))
    assert sink.events_path.exists()
    assert "sk-should-not-leak" not in sink.events_path.read_text()

    copy = tmp_path / "copy.jsonl"
    shutil.copy(sink.spool_path, copy)
    assert replay_spool(uri, run_id, sink.spool_path) == 600
    assert sink.spool_path.stat().st_size == 0
    # a crash before the offset commit means a re-send: identical points are not duplicated
    shutil.copy(copy, sink.spool_path)
    assert replay_spool(uri, run_id, sink.spool_path) == 600
    assert _steps(uri, run_id, "loss") == Counter(range(300))
    assert _steps(uri, run_id, "acc") == Counter(range(300))
    assert [e["kind"] for e in read_events(uri, run_id)] == ["rollback"]


def test_full_queue_spills_to_spool(uri: str, run_id: str, tmp_path: Path) -> None:
    sink = MetricSink(uri, run_id, flush_interval_s=60, max_queue=10, spool_dir=tmp_path / "s")
    for step in range(100):
        sink.log(step, {"loss": float(step)})
    assert sink.pending == 100
    assert len(sink.spool_path.read_text().splitlines()) == 90
    sink.close()
    assert sink.pending == 0
    assert _steps(uri, run_id, "loss") == Counter(range(100))


def test_events_artifact(uri: str, run_id: str, tmp_path: Path) -> None:
    sink = MetricSink(uri, run_id, flush_interval_s=0.1, spool_dir=tmp_path / "spool")
    sink.event("lisa_switch", 10, layers=[1, 3])
    sink.event("rollback", 20, to_step=16, hf_token="hf_secret")
    sink.event("odd", 30, time=3)  # a clashing payload key is renamed, never raised on
    sink.log(30, {"loss": 1.5, "grad_norm": None})  # type: ignore[dict-item]
    assert sink.flush(timeout_s=10)
    sink.close()
    events = read_events(uri, run_id)
    kinds = [(e["kind"], e["step"]) for e in events]
    assert kinds == [("lisa_switch", 10), ("rollback", 20), ("odd", 30)]
    assert events[0]["layers"] == [1, 3] and events[1]["hf_token"] == "***"
    assert events[2]["payload_time"] == 3 and events[2]["time"] > 1e9
    assert _steps(uri, run_id, "loss") == Counter([30])
    assert sink.events_path.read_text().count("\n") == 3
