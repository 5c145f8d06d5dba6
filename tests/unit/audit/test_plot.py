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
