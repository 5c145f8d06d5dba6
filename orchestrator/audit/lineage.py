"""The lineage of a job: its segments (automatic rollbacks, manual rollbacks, resumes).

Every segment is an MLflow run whose ``mlflow.parentRunId`` is the run it continues
(see :mod:`orchestrator.tracking.segments`). The lineage of a run is the tree under its
*root*: the topmost ancestor that is not a sweep. Events of every run of the tree
merge into one timeline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from orchestrator.audit.fetch import RunView

# Events worth a line in the timeline; checkpoints are listed separately.
TIMELINE_SKIP = {"checkpoint"}
_DROP = {"kind", "step", "time", "checkpoint"}


@dataclass
class Node:
    """One run of a lineage tree and the runs that continue it."""

    view: RunView
    children: list[Node] = field(default_factory=list)
    depth: int = 0

    def walk(self) -> Iterator[Node]:
        """This node, then its descendants, depth first, oldest child first."""
        yield self
        for child in self.children:
            yield from child.walk()


def find_root(view: RunView, get: Callable[[str], RunView | None]) -> RunView:
    """Follow ``mlflow.parentRunId`` up while the parent is not a sweep."""
    seen = {view.run_id}
    while view.parent_id and view.parent_id not in seen:
        parent = get(view.parent_id)
        if parent is None or parent.role == "sweep":
            break
        seen.add(parent.run_id)
        view = parent
    return view


def build_tree(root: RunView, children_of: Callable[[RunView], list[RunView]]) -> Node:
    """The tree under ``root``; children sorted by start time; cycles are cut."""
    seen: set[str] = set()

    def grow(view: RunView, depth: int) -> Node:
        seen.add(view.run_id)
        node = Node(view, depth=depth)
        kids = [c for c in children_of(view) if c.run_id not in seen]
        node.children = [grow(c, depth + 1) for c in sorted(kids, key=lambda v: v.start_ms or 0)]
        return node

    return grow(root, 0)


def describe(view: RunView) -> str:
    """One line saying how a segment began and why."""
    tags, kind = view.tags, view.kind
    restored = tags.get("regimen.restored_step")
    if kind == "rollback":
        why = view.reason
        detector = tags.get("regimen.detector") or why.get("detector", "")
        value, threshold = (
            tags.get("regimen.detector_value"),
            tags.get("regimen.detector_threshold"),
        )
        text = f"rollback at step {tags.get('regimen.from_step', '?')} -> step {restored}"
        if detector:
            text += f" ({detector}"
            text += f" {_num(value)} > {_num(threshold)})" if value and threshold else ")"
        skipped = tags.get("regimen.skipped_ranges")
        if skipped and skipped != "[]":
            text += f", skipped samples {skipped}"
        return text
    if kind == "manual-rollback":
        text = f"manual rollback to step {restored}"
        skipped = tags.get("regimen.skipped_ranges")
        if skipped and skipped != "[]":
            text += f", skipped samples {skipped}"
        if tags.get("regimen.lr_scale") not in (None, "1.0"):
            text += f", lr x{tags['regimen.lr_scale']}"
        return text
    if kind == "resume":
        stale = " (previous driver gone)" if tags.get("regimen.parent_was_stale") == "true" else ""
        return f"resume from step {restored}{stale}"
    return "start"


def _num(text: str | None) -> str:
    try:
        return f"{float(text or ''):.3g}"
    except ValueError:
        return str(text)


def status_text(view: RunView) -> str:
    """``STATUS`` plus the end reason when there is one."""
    reason = view.tags.get("regimen.end_reason")
    return f"{view.status} ({reason})" if reason else view.status


def render_tree(tree: Node) -> list[str]:
    """The tree as indented lines: run name, short id, status, how it began."""
    lines = []
    for node in tree.walk():
        v = node.view
        indent = "" if node.depth == 0 else "   " * (node.depth - 1) + "└─ "
        steps = v.metrics.get("steps")
        at = f" steps={int(steps)}" if steps is not None else ""
        lines.append(f"{indent}{v.name} [{v.short}] {describe(v)}: {status_text(v)}{at}")
    return lines


def tree_json(tree: Node) -> dict[str, Any]:
    """The tree as nested dicts (for ``--json``)."""
    v = tree.view
    return {
        "run_id": v.run_id,
        "name": v.name,
        "status": v.status,
        "kind": v.kind,
        "description": describe(v),
        "end_reason": v.tags.get("regimen.end_reason"),
        "restored_step": _int(v.tags.get("regimen.restored_step")),
        "children": [tree_json(c) for c in tree.children],
    }


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "") else None
    except ValueError:
        return None


def timeline(events_by_run: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every event of the lineage, by time, each with the short id of the run it came from."""
    out = [
        {**e, "run": run_id[:8]}
        for run_id, events in events_by_run.items()
        for e in events
        if e.get("kind") not in TIMELINE_SKIP
    ]
    return sorted(out, key=lambda e: (e.get("time", 0), e.get("step", 0)))


def render_timeline(events: list[dict[str, Any]]) -> list[str]:
    """One line per event: time, step, kind, run and the payload's remaining fields."""
    lines = []
    for e in events:
        when = datetime.fromtimestamp(float(e.get("time", 0))).strftime("%H:%M:%S")
        rest = {k: v for k, v in e.items() if k not in _DROP and k != "run"}
        detail = json.dumps(rest, default=str, separators=(",", ":"))
        if len(detail) > 160:
            detail = detail[:157] + "..."
        lines.append(
            f"{when} step {e.get('step', '?'):>6} {e.get('kind', ''):<16} {e['run']} {detail}"
        )
    return lines


def stitched(tree: Node, curves: dict[str, list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The curve of the timeline that was kept: each segment replaces its parent's points
    after the step it restored (a rolled-back stretch disappears)."""
    points: dict[int, float] = {}
    for node in tree.walk():
        restored = _int(node.view.tags.get("regimen.restored_step"))
        if node.depth and restored is not None:
            points = {s: v for s, v in points.items() if s <= restored}
        points.update(dict(curves.get(node.view.run_id, [])))
    return sorted(points.items())
