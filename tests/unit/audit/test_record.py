"""What the worker and driver add to a run's record: data input, ds_config, hardware,
checkpoints with manifests, driver tags (real MLflow sqlite store)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from orchestrator.tracking.record import (
    DRIVER_PID,
    checkpoint_records,
    driver_tags,
    log_worker_record,
    process_started,
)
from orchestrator.tracking.runs import open_run


def test_worker_record_logs_dataset_ds_config_and_hardware(tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow import MlflowClient

    uri = mlflow_uri
    rid = open_run(uri, "e", "r")
    fp = "ab" * 32
    recipe = {"data": {"kind": "stdlib_bytes", "seq_len": 32}, "model": {"kind": "hf_config"}}
    ds = {"train_batch_size": 8, "zero_optimization": {"stage": 2}}
    ok = log_worker_record(
        uri, rid, recipe=recipe, fingerprint=fp, description="stdlib: 3 files",
        ds_config=ds, world_size=2, device="cpu",
    )  # fmt: skip
    assert ok
    client = MlflowClient(uri)
    run = client.get_run(rid)
    (di,) = run.inputs.dataset_inputs
    assert di.dataset.digest == fp[:32] and json.loads(di.dataset.profile)["fingerprint"] == fp
    assert run.data.tags["regimen.world_size"] == "2" and run.data.tags["regimen.device"] == "cpu"
    assert run.data.tags["regimen.data_fingerprint"] == fp
    local = client.download_artifacts(rid, "ds_config.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["zero_optimization"] == {"stage": 2}
    assert not log_worker_record(  # an unknown run: a warning, never an exception
        uri, "0" * 32, recipe=recipe, fingerprint=fp, description="", ds_config=None,
        world_size=1, device="cpu",
    )  # fmt: skip


def test_checkpoint_records_and_driver_tags(tmp_path: Path) -> None:
    for root, step in (("checkpoints", 4), ("abandoned/rollback-1", 6)):
        d = tmp_path / root / f"step-{step}"
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"step": step, "files": {}}))
    (tmp_path / "checkpoints" / "step-8").mkdir()  # no manifest: not committed
    recs = checkpoint_records(tmp_path)
    assert [(r["step"], r["state"]) for r in recs] == [(4, "committed"), (6, "abandoned")]
    tags = driver_tags()
    assert tags[DRIVER_PID] == str(os.getpid()) and process_started(os.getpid())
