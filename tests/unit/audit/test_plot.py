"""Loss plots: one line per series, markers per event kind, a real image file."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.audit.plot import Series, plot_curves
from orchestrator.errors import UsageError


def test_one_line_per_series_and_markers(tmp_path: Path) -> None:
    series = [
        Series("job", [(s, 3.0 - 0.1 * s) for s in range(1, 9)]),
        Series("seg1", [(s, 2.5 - 0.1 * s) for s in range(7, 13)]),
        Series("empty", []),
    ]
    events = [
        {"kind": "spike", "step": 8, "at_step": 7},
        {"kind": "rollback", "step": 8, "from_step": 8, "to_step": 6},
        {"kind": "lisa_switch", "step": 10},
        {"kind": "checkpoint", "step": 4},
    ]
    info = plot_curves(series, tmp_path / "loss.png", events=events)
    assert info.lines == ["job", "seg1"]  # an empty series draws nothing
    assert info.markers == {"spike": 1, "rollback": 1, "lisa_switch": 1}
    data = (tmp_path / "loss.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and info.size_bytes == len(data) > 10_000


def test_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        plot_curves([Series("a", [(1, 1.0)])], tmp_path / "nope" / "x.png")


def test_a_spike_that_dwarfs_the_curve_gets_a_log_axis(tmp_path: Path) -> None:
    smooth = [(s, 3.0 - 0.05 * s) for s in range(1, 40)]
    info = plot_curves([Series("job", smooth)], tmp_path / "smooth.png")
    assert info.yscale == "linear"
    spiked = [(s, 300.0 if s == 20 else v) for s, v in smooth]  # x100 at step 20
    info = plot_curves([Series("job", spiked)], tmp_path / "spiked.png")
    assert info.yscale == "log"
    assert info.to_json()["yscale"] == "log"
    # a mild bump (x3) keeps the linear axis; values <= 0 cannot go on a log axis
    mild = [(s, 9.0 if s == 20 else v) for s, v in smooth]
    assert plot_curves([Series("job", mild)], tmp_path / "mild.png").yscale == "linear"
    signed = [*spiked, (41, -1.0)]
    assert plot_curves([Series("job", signed)], tmp_path / "signed.png").yscale == "linear"


def test_markers_name_the_detector_that_fired(tmp_path: Path) -> None:
    series = [Series("job", [(s, 3.0 - 0.1 * s) for s in range(1, 12)])]
    events = [
        {"kind": "spike", "step": 5, "at_step": 5, "detector": "grad_z", "value": 9.0},
        {"kind": "spike", "step": 6, "at_step": 6, "detector": "loss_z", "value": 40.0},
        {"kind": "spike", "step": 8, "at_step": 8, "detector": "nan"},
        {"kind": "rollback", "step": 7, "from_step": 7, "to_step": 4,
         "reason": {"onset_step": 6, "reason": {"detector": "loss_z"}}},
        {"kind": "resume", "step": 9, "from_step": 9},
    ]  # fmt: skip
    info = plot_curves(series, tmp_path / "loss.png", events=events)
    assert info.marker_labels == [
        "spike (grad_z)",
        "spike (loss_z)",
        "spike (nan)",
        "rollback (loss_z)",
        "resume",
    ]
    assert info.markers == {"spike": 3, "rollback": 1, "resume": 1}


def test_a_spike_marker_sits_on_the_spiked_value_not_the_redone_step(tmp_path: Path) -> None:
    """The guard's ``at_step`` is the index of the step run (logged as at_step + 1); after a
    rollback the next segment logs that step again, healthy: the marker goes on the spike."""
    job = [(s, 300.0 if s == 41 else 3.0) for s in range(1, 43)]
    seg = [(s, 2.9) for s in range(33, 60)]
    events = [{"kind": "spike", "step": 41, "at_step": 40, "detector": "loss_z"}]
    info = plot_curves([Series("job", job), Series("seg1", seg)], tmp_path / "p.png", events=events)
    assert info.marker_at == [(41, 300.0)]
