"""Gather audits from MLflow: one run's report, a comparison, an experiment's table.

The functions here do the MLflow reads (through :mod:`orchestrator.audit.fetch`) and
return plain dicts; the CLI renders them as text or JSON. Each reconciles the runs it
reads first (:mod:`orchestrator.audit.reconcile`), so a run whose driver died shows as
KILLED with the reason rather than as RUNNING forever.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from orchestrator.audit import compare as cmp
from orchestrator.audit import lineage as lin
from orchestrator.audit import table as tbl
from orchestrator.audit.fetch import (
    RunView,
    artifact_text,
    children,
    experiment_ids,
    get_view,
    metric_history,
    search_views,
)
from orchestrator.audit.plot import PlotInfo, Series, plot_curves
from orchestrator.audit.reconcile import reconcile
from orchestrator.tracking.record import CHECKPOINTS_ARTIFACT, DS_CONFIG_ARTIFACT
from orchestrator.tracking.runs import RECIPE_ARTIFACT, read_events

PROVENANCE_PREFIXES = ("regimen.versions.", "regimen.git_", "regimen.factory")
PROVENANCE_KEYS = (
    "regimen.version",
    "regimen.python",
    "regimen.host",
    "regimen.recipe_sha256",
    "regimen.data_fingerprint",
    "regimen.world_size",
    "regimen.device",
    "regimen.device_name",
    "regimen.machine",
    "regimen.run_dir",
    "regimen.checkpoint",
)


def recipe_summary(recipe_yaml: str | None) -> dict[str, Any]:
    """The few recipe facts a reader wants first (model, data, schedule, techniques, ...)."""
    if not recipe_yaml:
        return {}
    r = yaml.safe_load(recipe_yaml) or {}
    model, data = r.get("model") or {}, r.get("data") or {}
    sched, opt = r.get("schedule") or {}, r.get("optimizer") or {}
    cfg = model.get("config") or {}
    size = {k: cfg[k] for k in ("hidden_size", "num_hidden_layers") if k in cfg}
    zero = ((r.get("deepspeed") or {}).get("zero_optimization") or {}).get("stage", 0)
    techniques = sorted(
        k for k, v in (r.get("techniques") or {}).items() if v and v.get("enabled", True)
    )
    return {
        "name": r.get("name"),
        "model": " ".join(
            str(x) for x in (model.get("kind"), model.get("architecture") or model.get("factory"))
        )
        + (f" {size}" if size else ""),
        "data": f"{data.get('kind')} seq_len={data.get('seq_len')}",
        "steps": sched.get("steps"),
        "micro_batch_size": sched.get("micro_batch_size"),
        "optimizer": f"{opt.get('name')} lr={opt.get('lr')}",
        "techniques": techniques,
        "workers": (r.get("resources") or {}).get("workers"),
        "zero_stage": zero,
        "seed": r.get("seed"),
    }


def _events(uri: str, run_id: str) -> list[dict[str, Any]]:
    try:
        return read_events(uri, run_id)
    except Exception:
        return []


def _lineage(client: Any, view: RunView) -> lin.Node:
    cache: dict[str, RunView] = {view.run_id: view}

    def get(run_id: str) -> RunView | None:
        if run_id not in cache:
            try:
                cache[run_id] = get_view(client, run_id)
            except Exception:
                return None
        return cache[run_id]

    return lin.build_tree(lin.find_root(view, get), lambda v: children(client, v))


def run_report(uri: str, client: Any, run_id: str, *, plot: str | None = None) -> dict[str, Any]:
    """Everything about one run and its lineage; ``plot`` draws the loss of every segment."""
    view = get_view(client, run_id)
    tree = _lineage(client, view)
    nodes = list(tree.walk())
    stale = reconcile(uri, client, [n.view for n in nodes], by="regimen audit")
    recipe_yaml = artifact_text(client, run_id, RECIPE_ARTIFACT)
    if recipe_yaml is None and tree.view.run_id != run_id:  # a segment: its job's recipe
        recipe_yaml = artifact_text(client, tree.view.run_id, RECIPE_ARTIFACT)
    events = {n.view.run_id: _events(uri, n.view.run_id) for n in nodes}
    checkpoints = _checkpoints(client, view, events.get(run_id, []))
    ds_config = artifact_text(client, run_id, DS_CONFIG_ARTIFACT)
    tags = view.tags
    report: dict[str, Any] = {
        "run_id": view.run_id,
        "name": view.name,
        "status": view.status,
        "end_reason": tags.get("regimen.end_reason"),
        "variant": tags.get("regimen.variant"),
        "recipe": recipe_summary(recipe_yaml),
        "provenance": {
            k: v
            for k, v in sorted(tags.items())
            if k in PROVENANCE_KEYS or k.startswith(PROVENANCE_PREFIXES)
        },
        "datasets": _datasets(client, run_id),
        "ds_config": json.loads(ds_config) if ds_config else None,
        "lineage": lin.tree_json(tree),
        "lineage_text": lin.render_tree(tree),
        "events": lin.timeline(events),
        "metrics": {k: view.metrics[k] for k in cmp.metric_keys([view], limit=40)},
        "checkpoints": checkpoints,
        "reconciled": [{"run_id": v.run_id, "reason": j.reason} for v, j in stale if j.stale],
    }
    if plot:
        curves = {n.view.run_id: metric_history(client, n.view.run_id) for n in nodes}
        series = [
            Series(f"{n.view.name} [{n.view.short}] {n.view.kind}", curves[n.view.run_id])
            for n in nodes
        ]
        all_events = [e for evs in events.values() for e in evs]
        info = plot_curves(series, plot, events=all_events, title=f"loss of {view.name} (lineage)")
        report["plot"] = info.to_json()
    return report


def _datasets(client: Any, run_id: str) -> list[dict[str, Any]]:
    try:
        inputs = client.get_run(run_id).inputs
    except Exception:
        return []
    out = []
    for di in getattr(inputs, "dataset_inputs", None) or []:
        ds = di.dataset
        out.append(
            {"name": ds.name, "digest": ds.digest, "source": ds.source, "profile": ds.profile}
        )
    return out


def _checkpoints(client: Any, view: RunView, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``checkpoints.json`` artifact (manifests summarised), else the checkpoint events."""
    text = artifact_text(client, view.run_id, CHECKPOINTS_ARTIFACT)
    if text:
        out = []
        for rec in json.loads(text):
            files = (rec.get("manifest") or {}).get("files") or {}
            size = sum(int(f.get("bytes", f.get("size", 0)) or 0) for f in files.values())
            out.append(
                {"step": rec.get("step"), "state": rec.get("state"), "path": rec.get("path"),
                 "files": len(files), "bytes": size}
            )  # fmt: skip
        return out
    return [
        {"step": e.get("step"), "state": "written", "path": e.get("path")}
        for e in events
        if e.get("kind") == "checkpoint"
    ]


def render_report(report: dict[str, Any]) -> list[str]:
    """A run report as text sections."""
    lines = [f"run {report['name']} [{report['run_id']}]: {report['status']}"]
    if report.get("end_reason"):
        lines.append(f"  end reason: {report['end_reason']}")
    for item in report.get("reconciled", []):
        lines.append(f"  reconciled {item['run_id'][:8]}: {item['reason']}")
    lines.append("\nrecipe:")
    lines += [f"  {k}: {v}" for k, v in report["recipe"].items()]
    lines.append("\nprovenance:")
    lines += [f"  {k}: {v}" for k, v in report["provenance"].items()]
    for ds in report.get("datasets", []):
        lines.append(f"  dataset: {ds['name']} digest={ds['digest']}")
    lines.append("\nlineage:")
    lines += [f"  {line}" for line in report["lineage_text"]]
    lines.append(f"\nevents ({len(report['events'])}):")
    lines += [f"  {line}" for line in lin.render_timeline(report["events"])]
    lines.append("\nfinal metrics:")
    lines += [f"  {k}: {cmp.fmt(v)}" for k, v in report["metrics"].items()]
    lines.append(f"\ncheckpoints ({len(report['checkpoints'])}):")
    for c in report["checkpoints"]:
        extra = f" {c['files']} files, {c['bytes']} bytes" if "files" in c else ""
        lines.append(f"  step {c['step']} {c['state']}: {c['path']}{extra}")
    if report.get("plot"):
        p = report["plot"]
        lines.append(f"\nplot: {p['path']} ({len(p['lines'])} lines, markers {p['markers']})")
    return lines


def compare_report(
    uri: str, client: Any, run_ids: list[str], *, plot: str | None = None
) -> dict[str, Any]:
    """Recipe diff and final metrics of several runs; ``plot`` overlays their loss curves
    (each run's kept timeline: its rollback segments and resumes stitched in)."""
    views = [get_view(client, r) for r in run_ids]
    reconcile(uri, client, views, by="regimen audit")
    flats = {
        v.run_id: cmp.flat_recipe(artifact_text(client, v.run_id, RECIPE_ARTIFACT)) for v in views
    }
    diff = cmp.recipe_diff(flats)
    metrics = cmp.metrics_side_by_side(views)
    out: dict[str, Any] = {
        "runs": [{"run_id": v.run_id, "name": v.name, "status": v.status} for v in views],
        "recipe_diff": diff,
        "metrics": metrics,
        "text": cmp.render_compare(views, diff, metrics),
    }
    if plot:
        series = []
        for v in views:
            tree = lin.build_tree(v, lambda x: children(client, x))
            curves = {n.view.run_id: metric_history(client, n.view.run_id) for n in tree.walk()}
            series.append(Series(f"{v.name} [{v.short}]", lin.stitched(tree, curves)))
        info: PlotInfo = plot_curves(series, plot, title="loss (compare)")
        out["plot"] = info.to_json()
    return out


def experiment_table(
    uri: str, client: Any, experiment: str, *, sort: str | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """The job runs of ``experiment`` as ``(columns, rows)``, reconciled, optionally sorted."""
    ids = experiment_ids(client, experiment)
    views = search_views(client, ids)
    reconcile(uri, client, views, by="regimen audit")
    columns, table = tbl.rows(views)
    if sort:
        table = tbl.sort_rows(columns, table, sort)
    return columns, table


def reconcile_store(
    uri: str, client: Any, experiment: str | None, *, stale_after_s: float, dry_run: bool
) -> list[dict[str, Any]]:
    """``--reconcile``: judge every RUNNING run (of ``experiment`` or of every experiment)."""
    if experiment:
        ids = experiment_ids(client, experiment)
    else:
        ids = [str(e.experiment_id) for e in client.search_experiments()]
    views = search_views(client, ids, "attributes.status = 'RUNNING'") if ids else []
    judged = reconcile(
        uri, client, views, by="regimen audit --reconcile", stale_after_s=stale_after_s,
        dry_run=dry_run,
    )  # fmt: skip
    return [
        {"run_id": v.run_id, "name": v.name, "stale": j.stale, "reason": j.reason,
         "ended": j.stale and not dry_run}
        for v, j in judged
    ]  # fmt: skip
