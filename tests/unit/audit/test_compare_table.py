"""Recipe diffs, side-by-side metrics and experiment tables on small fixtures."""

from __future__ import annotations

import csv
import io
import json

import pytest

from orchestrator.audit.compare import (
    flat_recipe,
    metrics_side_by_side,
    recipe_diff,
    render_compare,
)
from orchestrator.audit.fetch import RunView
from orchestrator.audit.table import key_params, rows, sort_rows, to_csv, to_json, to_text
from orchestrator.errors import UsageError

A = "name: t\noptimizer: {name: adamw, lr: 0.001}\nschedule: {steps: 10}\nseed: 0\n"
B = "name: t\noptimizer: {name: adamw, lr: 0.003}\nschedule: {steps: 10}\nextra: {x: [1, 2]}\n"


def _v(run_id: str, status: str = "FINISHED", **kw: object) -> RunView:
    return RunView(run_id=run_id, name=f"n-{run_id}", status=status, **kw)  # type: ignore[arg-type]


def test_recipe_diff_keeps_only_differing_keys() -> None:
    diff = recipe_diff({"a": flat_recipe(A), "b": flat_recipe(B)})
    assert diff == {
        "extra.x": {"a": "-", "b": "[1, 2]"},
        "optimizer.lr": {"a": "0.001", "b": "0.003"},
        "seed": {"a": "0", "b": "-"},
    }
    assert recipe_diff({"a": flat_recipe(A), "b": flat_recipe(A)}) == {}


def test_metrics_side_by_side_summary_first_and_missing_as_none() -> None:
    a = _v("a", metrics={"final_loss": 1.5, "steps": 10.0, "zeta": 1.0, "spike/loss_z": 9.0})
    b = _v("b", metrics={"final_loss": 1.25, "rollbacks": 1.0})
    m = metrics_side_by_side([a, b])
    assert list(m) == ["final_loss", "steps", "rollbacks", "zeta"]
    assert m["final_loss"] == {"a": 1.5, "b": 1.25} and m["steps"]["b"] is None
    text = "\n".join(render_compare([a, b], recipe_diff({"a": {"k": "1"}, "b": {"k": "2"}}), m))
    assert "recipe keys that differ (1)" in text and "1.25" in text


def test_the_workers_system_metrics_stay_out_of_the_side_by_side() -> None:
    machine = {f"system/rank{r}-1a2b3c4d/cpu_utilization_percentage": 50.0 for r in range(30)}
    a = _v("a", metrics={"final_loss": 1.5, **machine, "tokens_per_s": 9.0, "time/step_s": 0.1})
    assert list(metrics_side_by_side([a])) == ["final_loss", "time/step_s", "tokens_per_s"]


def _experiment() -> list[RunView]:
    def job(rid: str, lr: str, loss: float | None, start: int, **tags: str) -> RunView:
        return _v(
            rid, params={"optimizer.lr": lr, "seed": "0"}, start_ms=start, end_ms=start + 5000,
            metrics={} if loss is None else {"final_loss": loss, "steps": 10.0},
            tags={"regimen.variant": f"lr={lr}", **tags},
        )  # fmt: skip

    return [
        job("r1", "0.001", 2.0, 1000),
        job("r2", "0.003", 1.0, 2000, **{"regimen.rollbacks": "2"}),
        job("r3", "0.01", None, 3000),
        _v("sw", tags={"regimen.role": "sweep"}),
        _v("sg", tags={"regimen.role": "segment"}),
    ]


def test_table_rows_key_params_and_sorting() -> None:
    views = _experiment()
    assert key_params(views[:3]) == ["optimizer.lr"]
    columns, table = rows(views)
    assert [r["run_id"] for r in table] == ["r1", "r2", "r3"]  # no sweep, no segment rows
    assert "optimizer.lr" in columns and "seed" not in columns
    assert table[1]["rollbacks"] == 2.0 and table[0]["duration_s"] == 5.0
    assert [r["run_id"] for r in sort_rows(columns, table, "final_loss")] == ["r2", "r1", "r3"]
    assert [r["run_id"] for r in sort_rows(columns, table, "-final_loss")] == ["r1", "r2", "r3"]
    with pytest.raises(UsageError, match="no such column"):
        sort_rows(columns, table, "nope")


def test_table_csv_json_text() -> None:
    columns, table = rows(_experiment())
    parsed = list(csv.DictReader(io.StringIO(to_csv(columns, table))))
    assert [r["run_id"] for r in parsed] == ["r1", "r2", "r3"] and parsed[2]["final_loss"] == ""
    data = json.loads(to_json(columns, table))
    assert data["columns"] == columns and data["runs"][1]["optimizer.lr"] == "0.003"
    text = to_text(columns, table)
    assert text[0].split()[:3] == ["run_id", "name", "status"] and len(text) == 5
