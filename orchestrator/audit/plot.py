"""Loss curves for audits (matplotlib, Agg backend: no display needed).

One line per series (a segment of a lineage, or a run in a comparison); rollbacks,
spikes, resumes, LISA switches and skipped data as markers. A spike's or rollback's
marker names the detector that fired (``spike (loss_z)``, from the event's ``detector``
or its ``reason``), in the legend and beside the marker. When a spike dwarfs the curve
(max / median of the plotted values above :data:`LOG_RATIO`, all values positive) the
value axis is logarithmic, so the rest of the curve stays readable. :func:`plot_curves`
returns what it drew (:class:`PlotInfo`) so callers and tests can check it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError

# event kind -> (matplotlib marker, color, legend label)
MARKERS: dict[str, tuple[str, str, str]] = {
    "spike": ("v", "red", "spike"),
    "rollback": ("x", "red", "rollback"),
    "manual_rollback": ("X", "darkred", "manual rollback"),
    "resume": ("^", "green", "resume"),
    "lisa_switch": ("|", "gray", "LISA switch"),
    "skip_data": ("s", "orange", "skipped data"),
}

# max / median of the plotted values above which the value axis is logarithmic
LOG_RATIO = 10.0


@dataclass
class Series:
    """One curve: a label and its ``(step, value)`` points."""

    label: str
    points: list[tuple[int, float]]


@dataclass
class PlotInfo:
    """What was drawn: the file, its size, one label per line, marker counts by event kind,
    each marker's label (in event order) and the value axis scale (``linear`` or ``log``);
    ``marker_at``: each marker's ``(step, value)`` (value None: a vertical line)."""

    path: str
    size_bytes: int
    lines: list[str]
    markers: dict[str, int] = field(default_factory=dict)
    marker_labels: list[str] = field(default_factory=list)
    yscale: str = "linear"
    marker_at: list[tuple[int, float | None]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain dict for ``--json``."""
        return {
            "path": self.path,
            "size_bytes": self.size_bytes,
            "lines": self.lines,
            "markers": self.markers,
            "marker_labels": self.marker_labels,
            "yscale": self.yscale,
        }


def value_scale(series: list[Series], ratio: float = LOG_RATIO) -> str:
    """``log`` when the largest finite value exceeds ``ratio`` x the median and every value
    is positive (a log axis cannot show the others), else ``linear``."""
    values = [v for s in series for _, v in s.points if math.isfinite(v)]
    if not values or min(values) <= 0:
        return "linear"
    return "log" if max(values) > ratio * statistics.median(values) else "linear"


def detector_of(event: dict[str, Any]) -> str | None:
    """The detector an event names: its own ``detector``, else its ``reason``'s (a rollback
    carries the guard's record, whose own ``reason`` is the spike that started it)."""
    found: Any = event
    for _ in range(3):
        if not isinstance(found, dict):
            return None
        if found.get("detector") is not None:
            return str(found["detector"])
        found = found.get("reason")
    return None


def _value_at(series: list[Series], step: int, highest: bool = False) -> float | None:
    """The value at ``step``: the last series' (a redone step), or the highest (a spike: the
    value the guard saw, not the redone step of the segment after the rollback)."""
    best: float | None = None
    for s in series:
        for st, v in s.points:
            if st == step and (best is None or not highest or v > best):
                best = v
    return best


def plot_curves(
    series: list[Series],
    path: str | Path,
    *,
    events: list[dict[str, Any]] | None = None,
    title: str = "loss",
    ylabel: str = "loss",
) -> PlotInfo:
    """Draw ``series`` (one line each) with event markers into ``path`` (PNG, SVG, PDF...).

    An event marks the curve at its step: ``spike`` at the logged step of ``at_step`` (the
    index of the step run, logged as ``at_step + 1``) on the highest curve there, ``rollback`` at
    ``from_step`` with a dashed line back to ``to_step``, the others at ``step``.
    """
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(path)
    if out.parent and not out.parent.exists():
        raise UsageError(f"--plot {out}: directory {out.parent} does not exist")
    fig, ax = plt.subplots(figsize=(9, 5))
    lines = []
    try:
        for s in series:
            if not s.points:
                continue
            steps, values = zip(*s.points, strict=True)
            ax.plot(steps, values, label=s.label, linewidth=1.4)
            lines.append(s.label)
        yscale = value_scale(series)
        ax.set_yscale(yscale)
        counts: dict[str, int] = {}
        labelled: set[str] = set()
        marker_labels: list[str] = []
        marker_at: list[tuple[int, float | None]] = []
        for e in events or []:
            kind = str(e.get("kind"))
            if kind not in MARKERS:
                continue
            marker, color, label = MARKERS[kind]
            detector = detector_of(e) if kind in ("spike", "rollback") else None
            if detector is not None:
                label = f"{label} ({detector})"
            marker_labels.append(label)
            step = int(e.get("at_step", e.get("from_step", e.get("step", 0))) or 0)
            if kind == "spike" and e.get("at_step") is not None:
                step += 1  # at_step is the index of the step run; the loop logs step i as i + 1
            if kind == "resume":
                step = int(e.get("from_step", e.get("step", 0)) or 0)
            y = _value_at(series, step, highest=kind == "spike")
            marker_at.append((step, y))
            if kind == "rollback" and e.get("to_step") is not None:
                ax.axvspan(int(e["to_step"]), step, color="red", alpha=0.08)
            if y is None:
                ax.axvline(step, color=color, linestyle=":", linewidth=1)
            else:
                ax.plot(
                    [step], [y], marker=marker, color=color, linestyle="none", markersize=9,
                    label=None if label in labelled else label,
                )  # fmt: skip
                labelled.add(label)
                if detector is not None and kind == "spike":
                    ax.annotate(
                        detector, (step, y), textcoords="offset points", xytext=(4, 6),
                        fontsize=7, color=color,
                    )  # fmt: skip
            counts[kind] = counts.get(kind, 0) + 1
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if lines:
            ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        try:
            fig.savefig(out, dpi=100, bbox_inches="tight")
        except (OSError, ValueError) as exc:
            raise UsageError(f"--plot {out}: cannot write the figure: {exc}") from None
    finally:
        plt.close(fig)
    return PlotInfo(str(out), out.stat().st_size, lines, counts, marker_labels, yscale, marker_at)
