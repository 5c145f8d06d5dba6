"""orchestrator.rundir: the layout, atomic JSON, the summary/stopped/segment records, and that
no other module spells the layout itself."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from orchestrator import rundir as R
from orchestrator.rundir import RunDir, Segment, Stopped, atomic_write_json

ROOT = Path(__file__).resolve().parents[2] / "orchestrator"
# The layout spelled outside rundir.py: a record's file name, or "/ <folder>" on a path.
SPELLED = re.compile(
    r"(summary|stopped|segment)\.json|/ \"(checkpoints|abandoned|spool|ray|faults)\"|"
    r"/(checkpoints|abandoned)[/\"}]"
)
# Modules other branches adopt RunDir in (remove at merge).
PENDING: set[str] = set()  # modules not yet switched (none)


def test_layout(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run-1")
    assert rd.name == "run-1" and isinstance(RunDir(str(tmp_path)).root, Path)  # type: ignore[arg-type]
    assert rd.checkpoints == tmp_path / "run-1" / "checkpoints"
    assert rd.abandoned_for("rollback-2") == tmp_path / "run-1" / "abandoned" / "rollback-2"
    assert rd.spool == tmp_path / "run-1" / "spool"
    assert rd.metric_spool("abc") == rd.spool / "abc.metrics.jsonl"
    assert rd.ray == rd.root / "ray" and rd.faults == rd.root / "faults"
    assert (rd.summary.name, rd.stopped.name, rd.segment.name) == (
        "summary.json",
        "stopped.json",
        "segment.json",
    )
    assert not rd.root.exists() and rd.create() is rd and rd.root.is_dir()
    assert rd.metric_spools() is not None and list(rd.metric_spools()) == []
    assert rd.abandoned_sets() == []


def test_under_resolves_the_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert RunDir.under("runs", "r1").root == tmp_path.resolve() / "runs" / "r1"


def test_listings_are_sorted_and_filtered(tmp_path: Path) -> None:
    rd = RunDir(tmp_path).create()
    rd.spool.mkdir()
    for name in ("b.metrics.jsonl", "a.metrics.jsonl", "a.events.jsonl", "a.metrics.jsonl.offset"):
        (rd.spool / name).write_text("")
    assert [p.name for p in rd.metric_spools()] == ["a.metrics.jsonl", "b.metrics.jsonl"]
    for label in ("rollback-3", "rollback-1"):
        rd.abandoned_for(label).mkdir(parents=True)
    (rd.abandoned / "stray-file").write_text("")
    assert [p.name for p in rd.abandoned_sets()] == ["rollback-1", "rollback-3"]


def test_atomic_write_json_format_and_replace(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    atomic_write_json(p, {"b": 1, "a": [1, 2]})
    assert p.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    atomic_write_json(p, {"c": None})
    assert json.loads(p.read_text()) == {"c": None}
    assert [q.name for q in tmp_path.iterdir()] == ["x.json"]  # no temp file left


def test_atomic_write_json_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "x.json"
    atomic_write_json(p, {"old": True})

    def crash(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(R.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_json(p, {"new": True})
    assert json.loads(p.read_text()) == {"old": True}
    assert [q.name for q in tmp_path.iterdir()] == ["x.json"]


def test_atomic_write_json_fsyncs_file_and_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(R.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    atomic_write_json(tmp_path / "x.json", [1])
    assert len(synced) == 2


def test_records_round_trip(tmp_path: Path) -> None:
    rd = RunDir(tmp_path).create()
    assert rd.read_summary() is None and rd.read_stopped() is None and rd.read_segment() is None
    rd.write_summary({"steps": 3, "final_loss": 1.5, "events": []})
    assert rd.read_summary() == {"steps": 3, "final_loss": 1.5, "events": []}

    rd.write_stopped(Stopped(step=7, reason="budget used up"))
    assert rd.read_stopped() == Stopped(7, "budget used up")
    assert json.loads(rd.stopped.read_text()) == {"step": 7, "reason": "budget used up"}
    rd.clear_stopped()
    assert rd.read_stopped() is None
    rd.clear_stopped()  # twice is fine

    seg = Segment(segment=2, from_step=8, skip_ranges=[(32, 40)], lr_scale=0.5)
    rd.write_segment(seg)
    assert rd.read_segment() == seg
    # the on-disk form the workers read: lists of [start, end]
    assert json.loads(rd.segment.read_text()) == {
        "segment": 2,
        "from_step": 8,
        "skip_ranges": [[32, 40]],
        "lr_scale": 0.5,
    }
    rd.write_segment(Segment(segment=3, from_step=4))
    assert rd.read_segment() == Segment(3, 4, [], None)


def test_stopped_without_step_reads_back() -> None:
    assert Stopped.from_json({"reason": "r"}) == Stopped(-1, "r")


def test_a_bad_worker_stop_records_its_rank(tmp_path: Path) -> None:
    rd = RunDir(tmp_path).create()
    rd.write_stopped(Stopped(step=9, reason="rank 1 looks faulty", bad_rank=1))
    assert rd.read_stopped() == Stopped(9, "rank 1 looks faulty", 1)
    assert json.loads(rd.stopped.read_text())["bad_rank"] == 1


def test_no_other_module_spells_the_layout() -> None:
    found = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "rundir.py":
            continue
        code = "\n".join(
            line
            for line in path.read_text().splitlines()
            if not line.lstrip().startswith("#") and "``" not in line
        )
        if SPELLED.search(code):
            found.add(rel)
    assert found <= PENDING, f"use orchestrator.rundir instead: {sorted(found - PENDING)}"
