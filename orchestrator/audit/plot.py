"""Loss curves for audits (matplotlib, Agg backend: no display needed).

One line per series (a segment of a lineage, or a run in a comparison); rollbacks,
spikes, resumes, LISA switches and skipped data as markers. :func:`plot_curves`
returns what it drew (:class:`PlotInfo`) so callers and tests can check it.
"""

from __future__ import annotations

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


@dataclass
class Series:
    """One curve: a label and its ``(step, value)`` points."""

    label: str
    points: list[tuple[int, float]]


@dataclass
class PlotInfo:
    """What was drawn: the file, its size, one label per line, marker counts by event kind."""

    path: str
    size_bytes: int
    lines: list[str]
    markers: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain dict for ``--json``."""
        return {
            "path": self.path,
            "size_bytes": self.size_bytes,
            "lines": self.lines,
            "markers": self.markers,
        }


def _value_at(series: list[Series], step: int) -> float | None:
    best: float | None = None
    for s in series:
        for st, v in s.points:
            if st == step:
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

    An event marks the curve at its step: ``spike`` at ``at_step``, ``rollback`` at
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
        counts: dict[str, int] = {}
        labelled: set[str] = set()
        for e in events or []:
            kind = str(e.get("kind"))
            if kind not in MARKERS:
                continue
            marker, color, label = MARKERS[kind]
            step = int(e.get("at_step", e.get("from_step", e.get("step", 0))) or 0)
            if kind == "resume":
                step = int(e.get("from_step", e.get("step", 0)) or 0)
            y = _value_at(series, step)
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
    return PlotInfo(str(out), out.stat().st_size, lines, counts)
