"""The technique interface v2 by effect: decisions as values, declared capabilities,
a read-only state with requests, recorded metrics, on_error / close."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_recipe
from orchestrator.engine.loop import StepHook, Trainer, WorkerContext
from orchestrator.techniques.base import (
    Action,
    Capability,
    Decision,
    Technique,
    TrainState,
    combine,
)
from orchestrator.techniques.registry import build_techniques

# tiny recipe: micro batch 4, one rank, no accumulation: a step consumes 4 stream samples
GLOBAL = 4


def test_combine_takes_the_highest_action_and_merges_rollbacks():
    assert combine([]) == Decision() and combine([Decision(), Decision()]).action == Action.PROCEED
    assert combine([Decision.skip_step(), Decision()]).action == Action.SKIP_STEP
    a = Decision.rollback(to_step=6, skip=[(10, 20)], reason={"by": "a", "x": 1})
    b = Decision.rollback(
        to_step=4, skip=[(30, 40), (10, 20)], reset_moments=True, reason={"by": "b"}
    )
    got = combine([Decision.skip_step(), a, b])
    assert got.action == Action.ROLLBACK and got.to_step == 4  # the earliest bound
    assert got.skip == ((10, 20), (30, 40)) and got.reset_moments
    assert got.reason == {"by": "a", "x": 1}  # the earlier technique's keys win
    assert combine([a, Decision.rollback(reason={"by": "c"})]).to_step == 6  # None: no bound
    stop = combine([a, Decision.stop("first"), Decision.stop("second")])
    assert stop.action == Action.STOP and stop.message == "first; second"
    assert Decision.rollback(skip=[(5, 5), (3, 1)]).skip == ()  # empty ranges dropped


def test_a_stop_keeps_the_suspect_rank_it_names():
    assert Decision.stop("x").bad_rank is None
    bad = Decision.stop("bad worker", bad_rank=2)
    assert combine([Decision.skip_step(), bad]) is bad
    joined = combine([Decision.stop("other"), bad, Decision.stop("third", bad_rank=0)])
    assert joined.bad_rank == 2 and joined.message == "other; bad worker; third"
    assert combine([Decision.stop("a"), Decision.stop("b")]).bad_rank is None


def test_train_state_is_read_only_and_takes_requests(tmp_path):
    recipe = tiny_recipe(tmp_path)
    events: list[tuple[str, dict]] = []
    state = TrainState(recipe, total_steps=8, lr=0.1, on_event=lambda k, p: events.append((k, p)))
    for name, value in [("step", 3), ("lr", 1.0), ("lr_scale", 0.5), ("loss", 0.0)]:
        with pytest.raises(AttributeError, match="read-only"):
            setattr(state, name, value)
    state.set_lr(0.2)
    state.set_lr_scale(0.5)
    state.mark_regime_change()
    state.request_rebuild()
    state.record("a", 2.0, reduce="max")
    state.emit("thing", x=1)
    assert (state.lr, state.lr_scale, state.regime_change) == (0.2, 0.5, True)
    assert dict(state.metrics) == {"a": 2.0} and events == [("thing", {"x": 1})]
    with pytest.raises(TypeError):
        state.metrics["b"] = 1.0  # type: ignore[index]
    with pytest.raises(ValueError, match="reduce"):
        state.record("c", 1.0, reduce="median")  # type: ignore[arg-type]
    assert state._take_rebuild() and not state._take_rebuild()


class Roller(Technique):
    """Rolls back once, after step ``at`` ran, to ``to_step`` with a skip of ``skip``."""

    name = "roller"
    capabilities = frozenset({Capability.DECIDES_AFTER_STEP, Capability.KEEPS_STATE_ON_ROLLBACK})

    def __init__(self, at: int, to_step: int, skip: list[tuple[int, int]]):
        self.at, self.to_step, self.skip, self.done = at, to_step, skip, False
        self.cursors: list[int] = []

    def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> Decision:
        self.cursors.append(state.cursor)
        if state.step == self.at and not self.done:
            self.done = True
            return Decision.rollback(to_step=self.to_step, skip=self.skip, reason={"why": "test"})
        return Decision()

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}


class Counter(Technique):
    """Counts the steps it saw; restored on rollback unless ``keep``."""

    def __init__(self, name: str, keep: bool):
        self.name, self.count = name, 0
        if keep:
            self.capabilities = frozenset({Capability.KEEPS_STATE_ON_ROLLBACK})

    def on_step_begin(self, state: TrainState) -> None:
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.count = int(state["count"])


def test_a_rollback_decision_restores_its_step_and_skips_exactly_its_ranges(tmp_path, gloo_world):
    recipe = tiny_recipe(tmp_path, schedule={"steps": 8}, checkpoint={"every": 2})
    roller = Roller(at=5, to_step=3, skip=[(20, 28)])  # newest checkpoint at or before 3: 2
    kept, restored = Counter("kept", keep=True), Counter("restored", keep=False)
    trainer = Trainer(
        recipe, WorkerContext(run_dir=tmp_path / "run"), techniques=[kept, restored, roller]
    )
    summary = trainer.run()
    (rollback,) = [e for e in summary["events"] if e["kind"] == "rollback"]
    assert (rollback["from_step"], rollback["to_step"]) == (5, 2)
    assert rollback["skipped"] == [[20, 28]] and rollback["reason"] == {"why": "test"}
    assert trainer.loop.skip_ranges == [(20, 28)] and summary["rollbacks"] == 1
    # steps 0-4 from cursor 0; after the restore of step 2 the stream continues at 8 and
    # jumps over [20, 28) exactly
    first = [GLOBAL * k for k in range(5)]
    assert roller.cursors == [*first, 8, 12, 16, 28, 32, 36]
    assert summary["steps"] == 8 and summary["finished"]
    assert kept.count == 5 + 6  # kept across the rollback: every step it saw
    assert restored.count == 8  # came back with the checkpoint of step 2, then 6 more steps


def test_an_undeclared_decision_is_an_error(tmp_path, gloo_world):
    class Sneaky(Technique):
        name = "sneaky"

        def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> Decision:
            return Decision.stop("no capability declared")

    recipe = tiny_recipe(tmp_path, schedule={"steps": 2})
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"), techniques=[Sneaky()])
    with pytest.raises(RuntimeError, match="without declaring Capability.DECIDES_AFTER_STEP"):
        trainer.run()


class Lifecycle(Technique):
    name = "lifecycle"

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at
        self.calls: list[str] = []
        self.errors: list[BaseException] = []
        self.saved: list[tuple[int, str]] = []
        self.loaded: list[int] = []

    def on_step_begin(self, state: TrainState) -> None:
        if state.step == self.fail_at:
            raise ValueError(f"boom at {state.step}")

    def on_checkpoint_saved(self, state: TrainState, step: int, path: str) -> None:
        self.saved.append((step, Path(path).name))

    def on_checkpoint_loaded(self, state: TrainState, step: int) -> None:
        self.loaded.append(step)

    def on_train_end(self, state: TrainState) -> None:
        self.calls.append("end")

    def on_error(self, state: TrainState, exc: BaseException) -> None:
        self.calls.append("error")
        self.errors.append(exc)

    def close(self) -> None:
        self.calls.append("close")


def test_on_error_when_a_step_raises_and_close_always(tmp_path, gloo_world):
    recipe = tiny_recipe(tmp_path, schedule={"steps": 6}, checkpoint={"every": 2})
    failing = Lifecycle(fail_at=3)
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"), techniques=[failing])
    with pytest.raises(ValueError, match="boom at 3"):
        trainer.run()
    assert failing.calls == ["error", "close"] and str(failing.errors[0]) == "boom at 3"
    assert [s for s, _ in failing.saved] == [2]
    resumed = Lifecycle()
    summary = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"), techniques=[resumed]).run()
    assert summary["finished"] and resumed.calls == ["end", "close"]
    assert resumed.loaded == [2] and [s for s, _ in resumed.saved] == [4, 6]


def test_summary_hook_and_recorded_metrics_reach_the_run(tmp_path, gloo_world):
    class Reporting(Technique):
        name = "reporting"
        capabilities = frozenset({Capability.SUMMARIZES})

        def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> Decision:
            state.record("reporting/step", float(state.step), reduce="mean")
            return Decision()

        def summary(self) -> dict[str, Any]:
            return {"reporting": {"ok": True}}

    seen: list[dict[str, float]] = []

    class Spy(StepHook):
        def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            seen.append(metrics)

    recipe = tiny_recipe(tmp_path, schedule={"steps": 3}, checkpoint={"every": 0})
    trainer = Trainer(
        recipe, WorkerContext(run_dir=tmp_path / "run"), [Spy()], techniques=[Reporting()]
    )
    summary = trainer.run()
    assert summary["reporting"] == {"ok": True}
    assert [m["reporting/step"] for m in seen] == [1.0, 2.0, 3.0]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["reporting"] == {"ok": True}


def test_every_technique_builds_with_the_v2_interface(tmp_path):
    recipe = tiny_recipe(tmp_path, stability={"window": 8, "min_history": 3})
    (guard,) = [t for t in build_techniques(recipe) if t.name == "spike_guard"]
    assert {Capability.GUARDS_ROLLBACK, Capability.KEEPS_STATE_ON_ROLLBACK} <= guard.capabilities
    assert not hasattr(guard, "restore_on_rollback")
