"""`regimen audit` on a real MLflow sqlite store built by hand (no training): exit codes,
report contents, tables, reconcile of a run whose driver process is gone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import cli_exit, free_port
from orchestrator.tracking.record import DRIVER_PID, driver_tags, log_checkpoints
from orchestrator.tracking.runs import end_run, log_event, log_summary, open_run

RECIPE = "name: t\noptimizer: {name: adamw, lr: LR}\nschedule: {steps: 12}\n"


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return cli_exit(capsys, "audit", *args)


def _dead_pid() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return str(proc.pid)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path) -> dict[str, Any]:
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("audit")
    shutil.copy(mlflow_template_db, tmp / "mlflow.db")  # migrated once per session
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    runs: dict[str, Any] = {"uri": uri, "tmp": tmp}
    for lr in ("0.001", "0.003"):
        tags = {"regimen.variant": f"lr={lr}", **driver_tags()}
        rid = open_run(
            uri, "exp", f"v{lr}", recipe_yaml=RECIPE.replace("LR", lr), tags=tags,
            recipe={"optimizer": {"lr": float(lr)}},
        )  # fmt: skip
        for s in range(1, 13):
            client.log_metric(rid, "loss", 3.0 - 0.1 * s - float(lr), step=s)
        log_summary(uri, rid, {"final_loss": 2.0 - float(lr), "steps": 12})
        end_run(uri, rid, "FINISHED")
        runs[lr] = rid
    job = runs["0.003"]
    seg = open_run(
        uri, "exp", "v0.003-seg1", parent_run_id=job,
        tags={"regimen.role": "segment", "regimen.restored_step": "6", "regimen.from_step": "8",
              "regimen.reason": json.dumps({"kind": "rollback", "detector": "loss_z"})},
    )  # fmt: skip
    for s in range(7, 13):
        client.log_metric(seg, "loss", 1.0, step=s)
    end_run(uri, seg, "FINISHED")
    log_event(uri, job, "rollback", 8, {"from_step": 8, "to_step": 6})
    ckpt = tmp / "run" / "checkpoints" / "step-6"
    ckpt.mkdir(parents=True)
    manifest = {"step": 6, "files": {"a.pt": {"sha256": "x", "bytes": 10}}}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    log_checkpoints(uri, job, tmp / "run")
    runs["seg"] = seg
    stale_tags = {**driver_tags(), DRIVER_PID: _dead_pid()}
    runs["stale"] = open_run(uri, "ops", "stale", recipe_yaml=RECIPE, tags=stale_tags)
    stale_seg = open_run(
        uri, "ops", "stale-seg1", parent_run_id=runs["stale"], tags={"regimen.role": "segment"}
    )
    runs["stale_seg"] = stale_seg
    runs["stale2"] = open_run(uri, "ops", "stale2", recipe_yaml=RECIPE, tags=stale_tags)
    runs["alive"] = open_run(uri, "ops", "alive", recipe_yaml=RECIPE, tags=driver_tags())
    return runs


def test_bad_input_exits_2_without_traceback(
    store: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    uri = store["uri"]
    cases = [
        (["nope", "--tracking-uri", uri], "no MLflow run 'nope'"),
        (["x", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"], "no MLflow store"),
        (["x", "--tracking-uri", f"http://127.0.0.1:{free_port()}"], "unreachable"),
        (["--compare", store["0.001"], "--tracking-uri", uri], "at least two"),
        (["--experiment", "nope", "--tracking-uri", uri], "no MLflow experiment 'nope'"),
        (["--experiment", "exp", "--sort", "zzz", "--tracking-uri", uri], "no such column"),
        (["--experiment", "exp", "--json", "--csv", "--tracking-uri", uri], "exclude"),
    ]
    for args, message in cases:
        code, _, err = _cli(capsys, *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)


def test_report_json_lineage_metrics_checkpoints_and_plot(
    store: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    png = tmp_path / "l.png"
    code, out, _ = _cli(
        capsys, store["seg"], "--json", "--plot", str(png), "--tracking-uri", store["uri"]
    )
    assert code == 0
    rep = json.loads(out)
    assert rep["lineage"]["run_id"] == store["0.003"]  # the root, asked about a segment
    assert [c["kind"] for c in rep["lineage"]["children"]] == ["rollback"]
    assert rep["recipe"]["optimizer"] == "adamw lr=0.003" and len(rep["plot"]["lines"]) == 2
    assert png.stat().st_size > 10_000
    code, out, _ = _cli(capsys, store["0.003"], "--tracking-uri", store["uri"])
    assert code == 0 and "rollback at step 8 -> step 6" in out
    assert "step 6 committed" in out and "1 files, 10 bytes" in out and "final_loss: 1.997" in out


def test_compare_and_table(
    store: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a, b, uri = store["0.001"], store["0.003"], store["uri"]
    code, out, _ = _cli(capsys, "--compare", a, b, "--json", "--tracking-uri", uri)
    data = json.loads(out)
    assert code == 0 and list(data["recipe_diff"]) == ["optimizer.lr"]
    assert data["metrics"]["final_loss"] == {a: 1.999, b: 1.997}
    code, out, _ = _cli(capsys, "--experiment", "exp", "--csv", "--sort", "final_loss",
                        "--tracking-uri", uri)  # fmt: skip
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("run_id,name,status,variant")
    assert [ln.split(",")[0] for ln in lines[1:3]] == [b, a]  # lowest final_loss first


def test_reconcile_ends_only_runs_whose_driver_is_gone(
    store: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    uri = store["uri"]
    code, out, _ = _cli(capsys, "--reconcile", "--dry-run", "--json", "--tracking-uri", uri)
    found = {r["run_id"]: r for r in json.loads(out)["reconciled"]}
    assert code == 0 and found[store["stale"]]["stale"] and not found[store["alive"]]["stale"]
    client = MlflowClient(uri)
    assert client.get_run(store["stale"]).info.status == "RUNNING"  # dry run changed nothing
    code, out, _ = _cli(capsys, store["stale2"], "--tracking-uri", uri)  # touching it reconciles
    assert code == 0 and "reconciled" in out
    assert client.get_run(store["stale2"]).data.tags["regimen.reconciled_by"] == "regimen audit"
    assert client.get_run(store["stale"]).info.status == "RUNNING"  # not in that lineage
    code, out, _ = _cli(capsys, "--reconcile", "--tracking-uri", uri)
    assert code == 0 and "ended KILLED" in out
    stale, seg = client.get_run(store["stale"]), client.get_run(store["stale_seg"])
    assert stale.info.status == seg.info.status == "KILLED"
    assert "driver process" in stale.data.tags["regimen.end_reason"]
    assert stale.data.tags["regimen.reconciled_by"] == "regimen audit --reconcile"
    assert client.get_run(store["alive"]).info.status == "RUNNING"
