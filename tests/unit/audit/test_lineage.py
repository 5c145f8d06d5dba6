"""Lineage trees, segment descriptions, timelines and stitched curves on small fixtures."""

from __future__ import annotations

import json

from orchestrator.audit.fetch import RunView
from orchestrator.audit.lineage import (
    build_tree,
    describe,
    find_root,
    render_tree,
    stitched,
    timeline,
    tree_json,
)


def _v(run_id: str, start: int, parent: str | None = None, **tags: str) -> RunView:
    t = dict(tags)
    if parent:
        t["mlflow.parentRunId"] = parent
    return RunView(run_id=run_id, name=run_id, status="FINISHED", start_ms=start, tags=t)


SWEEP = _v("sweep0000", 0, **{"regimen.role": "sweep"})
JOB = _v("job00000", 1, "sweep0000")
SEG = _v(
    "seg00000", 3, "job00000",
    **{"regimen.role": "segment", "regimen.from_step": "8", "regimen.restored_step": "6",
       "regimen.reason": json.dumps({"kind": "rollback", "detector": "loss_z"}),
       "regimen.detector": "loss_z", "regimen.detector_value": "12.5",
       "regimen.detector_threshold": "6", "regimen.skipped_ranges": "[[28, 36]]"},
)  # fmt: skip
RES = _v(
    "res00000", 5, "job00000",
    **{"regimen.reason": "resume", "regimen.restored_step": "10",
       "regimen.parent_was_stale": "true"},
)  # fmt: skip
ALL = {v.run_id: v for v in (SWEEP, JOB, SEG, RES)}


def _children(view: RunView) -> list[RunView]:
    return [v for v in ALL.values() if v.parent_id == view.run_id][::-1]  # unsorted on purpose


def test_root_stops_below_the_sweep_and_children_sort_by_start() -> None:
    assert find_root(RES, ALL.get).run_id == "job00000"
    tree = build_tree(find_root(SEG, ALL.get), _children)
    assert [n.view.run_id for n in tree.walk()] == ["job00000", "seg00000", "res00000"]
    assert [n.depth for n in tree.walk()] == [0, 1, 1]


def test_descriptions_name_reason_detector_and_skips() -> None:
    assert describe(SEG) == (
        "rollback at step 8 -> step 6 (loss_z 12.5 > 6), skipped samples [[28, 36]]"
    )
    assert describe(RES) == "resume from step 10 (previous driver gone)"
    assert describe(JOB) == "start"
    manual = _v("m", 0, **{"regimen.reason": "rollback", "regimen.restored_step": "4",
                          "regimen.lr_scale": "0.5"})  # fmt: skip
    assert manual.kind == "manual-rollback" and "lr x0.5" in describe(manual)


def test_render_and_json_of_a_tree() -> None:
    tree = build_tree(JOB, _children)
    lines = render_tree(tree)
    assert lines[0].startswith("job00000 [job00000] start: FINISHED")
    assert lines[1].startswith("└─ seg00000") and "rollback at step 8" in lines[1]
    data = tree_json(tree)
    assert [c["kind"] for c in data["children"]] == ["rollback", "resume"]
    assert data["children"][0]["restored_step"] == 6


def test_stitched_curve_drops_the_rolled_back_stretch() -> None:
    tree = build_tree(JOB, _children)
    curves = {
        "job00000": [(s, 1.0) for s in range(1, 9)],  # steps 7, 8 are abandoned by the rollback
        "seg00000": [(s, 2.0) for s in range(7, 11)],
        "res00000": [(s, 3.0) for s in range(11, 13)],
    }
    points = dict(stitched(tree, curves))
    assert sorted(points) == list(range(1, 13))
    assert points[6] == 1.0 and points[7] == 2.0 and points[10] == 2.0 and points[12] == 3.0


def test_timeline_merges_runs_by_time_and_skips_checkpoints() -> None:
    events = {
        "job00000xyz": [{"kind": "rollback", "step": 8, "time": 2.0},
                        {"kind": "checkpoint", "step": 4, "time": 1.0}],
        "res00000xyz": [{"kind": "resume", "step": 10, "time": 3.0}],
        "seg00000xyz": [{"kind": "spike", "step": 8, "time": 1.5}],
    }  # fmt: skip
    got = timeline(events)
    assert [(e["kind"], e["run"]) for e in got] == [
        ("spike", "seg00000"), ("rollback", "job00000"), ("resume", "res00000"),
    ]  # fmt: skip
