"""LISA's broadcast through the forced world-1 path over a whole run (moved from
tests/unit/techniques/test_forced_collectives.py: two training runs take seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from unit.techniques.test_forced_collectives import Recorder, _events, _lisa_recipe, _weights

from orchestrator import distributed as D
from orchestrator.engine.loop import Trainer, WorkerContext

pytestmark = pytest.mark.integration


def test_lisa_broadcast_forced_at_world_one_changes_nothing(
    tmp_path: Path, gloo_world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = Trainer(_lisa_recipe(tmp_path), WorkerContext(run_dir=tmp_path / "plain"))
    plain_summary = plain.run()
    spy = Recorder(torch.distributed.broadcast)
    monkeypatch.setattr(D.dist, "broadcast", spy)
    forced = Trainer(_lisa_recipe(tmp_path), WorkerContext(run_dir=tmp_path / "forced"))
    with D.force_collectives():
        forced_summary = forced.run()
    # torch.distributed.broadcast is global: DeepSpeed's own (uint8) broadcasts pass too
    layer_lists = [s for s in spy.seen if s[1:] == (torch.int64, (2,))]
    assert len(layer_lists) >= 3 and {s[0] for s in layer_lists} == {torch.device("cpu")}
    switches = _events(forced_summary, "lisa_switch")
    assert len({tuple(e["layers"]) for e in switches}) > 1  # the run really switches layers
    assert switches == _events(plain_summary, "lisa_switch")  # the same layers chosen
    a, b = _weights(plain), _weights(forced)
    assert all(torch.equal(a[k], b[k]) for k in a)
