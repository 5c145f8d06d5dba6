"""Where one step's time goes: data loading, forward, backward, optimizer, the whole step.

The loop marks points in a step (:meth:`StepClock.begin`, :meth:`~StepClock.mark`,
:meth:`~StepClock.lap`); :meth:`~StepClock.metrics` turns the laps into ``time/data_s``,
``time/forward_s``, ``time/backward_s``, ``time/optimizer_s`` (sums over the step's
micro-batches) and ``time/step_s`` (from the step's start to its last point: the end of
the optimizer update). Time between a lap's end and the next mark (the loss read back,
the techniques' verdicts, the all-reduces) belongs to the step but to no phase.

On CUDA each point also records a CUDA event (from a pool reused every step), and forward,
backward, optimizer and the step are the GPU time between their events: recording costs
no host sync, and only :meth:`~StepClock.metrics` (called on logged steps) waits for the
step's last event. ``time/data_s`` is always host wall time: fetching a batch and queuing
its copy is the host's work. On the CPU everything is ``time.perf_counter``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

PHASES = ("data", "forward", "backward", "optimizer")
_HOST_ONLY = frozenset({"data"})


class StepClock:
    """The points and laps of the step in progress (one clock per trainer).

    ``event_factory`` makes the timing events on CUDA (tests pass a fake)."""

    def __init__(self, event_factory: Any = None) -> None:
        self._event_factory = event_factory
        self._events: list[Any] = []  # the pool: re-recorded every step
        self._host: list[float] = []  # host time of each point of this step
        self._laps: list[tuple[str, int, int]] = []  # (phase, from point, to point)
        self._cuda = False

    def begin(self, device: Any) -> None:
        """A step starts on ``device`` (the engine's): forget the last one, mark its start."""
        self._cuda = torch.device(device).type == "cuda"
        if self._cuda and self._event_factory is None:
            self._event_factory = lambda: torch.cuda.Event(enable_timing=True)
        self._host.clear()
        self._laps.clear()
        self.mark()

    def mark(self) -> None:
        """A point where a phase starts (the time since the last point is nobody's)."""
        index = len(self._host)
        self._host.append(time.perf_counter())
        if self._cuda:
            if index == len(self._events):
                self._events.append(self._event_factory())
            self._events[index].record()

    def lap(self, phase: str) -> None:
        """A point where ``phase`` ends; it began at the last point."""
        self.mark()
        self._laps.append((phase, len(self._host) - 2, len(self._host) - 1))

    def _seconds(self, phase: str, start: int, stop: int) -> float:
        if self._cuda and phase not in _HOST_ONLY:
            return float(self._events[start].elapsed_time(self._events[stop])) / 1e3
        return self._host[stop] - self._host[start]

    def metrics(self) -> dict[str, float]:
        """The split of the step so far (``time/step_s`` up to its last point); on CUDA
        waits for the last point's event."""
        if len(self._host) < 2:
            return {}
        last = len(self._host) - 1
        if self._cuda:
            self._events[last].synchronize()
        out = {f"time/{phase}_s": 0.0 for phase in PHASES}
        for phase, start, stop in self._laps:
            out[f"time/{phase}_s"] += self._seconds(phase, start, stop)
        out["time/step_s"] = self._seconds("step", 0, last)
        return out
