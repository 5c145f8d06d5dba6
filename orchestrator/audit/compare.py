"""Compare runs: the recipe keys that differ and the final metrics, side by side."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from orchestrator.audit.fetch import RunView
from orchestrator.tracking.runs import flatten_params

MISSING = "-"
# Final metrics shown first, in this order, when a run has them; other metrics follow.
SUMMARY_METRICS = (
    "final_loss",
    "final_eval_loss",
    "eval_loss",
    "eval_accuracy",
    "loss",
    "steps",
    "rollbacks",
    "regimen.resumes",
)


def flat_recipe(recipe_yaml: str | None) -> dict[str, str]:
    """A recipe's text as dotted ``key: value`` strings (the same shape as the run's params)."""
    if not recipe_yaml:
        return {}
    data = yaml.safe_load(recipe_yaml)
    return flatten_params(data, max_value_len=10**9, max_params=10**9) if data else {}


def recipe_diff(recipes: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """``{key: {run: value}}`` for keys whose value is not the same in every run (by key)."""
    keys = sorted({k for flat in recipes.values() for k in flat})
    out: dict[str, dict[str, str]] = {}
    for key in keys:
        values = {run: flat.get(key, MISSING) for run, flat in recipes.items()}
        if len(set(values.values())) > 1:
            out[key] = values
    return out


def metric_keys(views: list[RunView], limit: int = 20) -> list[str]:
    """The metrics to show: summary ones first, then the others any run has (up to ``limit``);
    not the spike guard's internals, nor the machines' ``system/…`` metrics (one set per
    worker: the MLflow UI's System metrics tab shows them)."""
    have = {k for v in views for k in v.metrics}
    first = [k for k in SUMMARY_METRICS if k in have]
    rest = sorted(k for k in have - set(first) if not k.startswith(("spike/", "system/")))
    return (first + rest)[:limit]


def metrics_side_by_side(views: list[RunView]) -> dict[str, dict[str, float | None]]:
    """``{metric: {run_id: latest value or None}}``."""
    return {k: {v.run_id: v.metrics.get(k) for v in views} for k in metric_keys(views)}


def fmt(value: Any) -> str:
    """A cell: numbers with 4 significant digits (integers as such), None as ``-``."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e12 else f"{value:.4g}"
    return str(value)


def render_grid(header: list[str], rows: list[list[Any]], max_width: int = 48) -> list[str]:
    """Rows as fixed-width text columns (cells cut to ``max_width``)."""
    cells = [[_cut(fmt(c), max_width) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render_compare(
    views: list[RunView], diff: dict[str, dict[str, str]], metrics: dict[str, dict[str, Any]]
) -> list[str]:
    """The comparison as text: a runs header, the recipe diff, then the metrics."""
    header = ["", *[f"{v.name} [{v.short}]" for v in views]]
    lines = ["runs:"]
    lines += render_grid(header, [["status", *[v.status for v in views]]])
    lines.append("")
    if diff:
        lines.append(f"recipe keys that differ ({len(diff)}):")
        lines += render_grid(header, [[k, *[d[v.run_id] for v in views]] for k, d in diff.items()])
    else:
        lines.append("recipes: identical")
    lines.append("")
    lines.append("final metrics:")
    lines += render_grid(header, [[k, *[m[v.run_id] for v in views]] for k, m in metrics.items()])
    return lines
