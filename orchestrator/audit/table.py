"""The runs of an experiment as one table: status, variant, key params, final metrics, rollbacks.

*Key params* are the params whose value is not the same in every run listed (the
sweep axes, overrides); constant params are left out. Sweep parents and rollback
segments are not rows (their job runs are).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from orchestrator.audit.compare import fmt, render_grid
from orchestrator.audit.fetch import RunView
from orchestrator.errors import UsageError

BASE_COLUMNS = ["run_id", "name", "status", "variant", "started", "duration_s"]
METRIC_COLUMNS = ["final_loss", "final_eval_loss", "steps", "rollbacks", "resumes"]
_METRIC_SOURCES = {"resumes": "regimen.resumes"}


def key_params(views: list[RunView], limit: int = 8) -> list[str]:
    """Params that vary across ``views`` (at most ``limit``, by name)."""
    keys = sorted({k for v in views for k in v.params})
    varying = [k for k in keys if len({v.params.get(k) for v in views}) > 1]
    return varying[:limit]


def rows(views: list[RunView]) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, rows)`` of job runs (sweeps and segments left out), oldest first."""
    jobs = [v for v in views if v.role not in ("sweep", "segment")]
    params = key_params(jobs)
    columns = BASE_COLUMNS + params + METRIC_COLUMNS
    out = []
    for v in jobs:
        started = v.start_ms / 1000 if v.start_ms else None
        duration = (v.end_ms - v.start_ms) / 1000 if v.end_ms and v.start_ms else None
        row: dict[str, Any] = {
            "run_id": v.run_id,
            "name": v.name,
            "status": v.status,
            "variant": v.tags.get("regimen.variant", ""),
            "started": started,
            "duration_s": round(duration, 1) if duration is not None else None,
        }
        row |= {p: v.params.get(p) for p in params}
        for m in METRIC_COLUMNS:
            value = v.metrics.get(_METRIC_SOURCES.get(m, m))
            if value is None and m == "rollbacks":
                value = _float(v.tags.get("regimen.rollbacks"))
            row[m] = value
        out.append(row)
    return columns, out


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _sort_value(value: Any) -> tuple[int, Any]:
    if value is None or value == "":
        return (2, 0)
    try:
        return (0, float(value))
    except (TypeError, ValueError):
        return (1, str(value))


def sort_rows(columns: list[str], table: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Rows sorted by column ``key`` (``-key``: descending); empty cells last either way."""
    desc = key.startswith("-")
    name = key.lstrip("-")
    if name not in columns:
        raise UsageError(f"--sort {key}: no such column; columns: {', '.join(columns)}")
    present = [r for r in table if r.get(name) not in (None, "")]
    empty = [r for r in table if r.get(name) in (None, "")]
    present.sort(key=lambda r: _sort_value(r.get(name)), reverse=desc)
    return present + empty


def to_json(columns: list[str], table: list[dict[str, Any]]) -> str:
    """The table as one JSON object: ``{"columns": [...], "runs": [{...}, ...]}``."""
    return json.dumps({"columns": columns, "runs": table}, default=str)


def to_csv(columns: list[str], table: list[dict[str, Any]]) -> str:
    """The table as CSV with a header row (empty cells for missing values)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()


def to_text(columns: list[str], table: list[dict[str, Any]]) -> list[str]:
    """The table as fixed-width text; run ids shortened, times readable."""
    from datetime import datetime

    def cell(col: str, value: Any) -> Any:
        if col == "run_id":
            return str(value)[:8]
        if col == "started" and value:
            return datetime.fromtimestamp(float(value)).strftime("%m-%d %H:%M")
        return fmt(value)

    return render_grid(columns, [[cell(c, r.get(c)) for c in columns] for r in table], 32)
