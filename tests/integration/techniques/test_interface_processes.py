"""The interface across two real gloo ranks (two processes; moved from
tests/unit/techniques/test_interface.py: it takes seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from two_ranks import run_two_ranks

pytestmark = pytest.mark.integration


_TWO_RANKS = """
    import json

    def worker(rank, out):
        from orchestrator.engine.trainer import reduce_metrics
        from orchestrator.techniques.base import TrainState
        state = TrainState(None, total_steps=1, rank=rank, world_size=2)
        state.record("local", float(rank))
        state.record("peak", [3.0, 7.0][rank], reduce="max")
        state.record("avg", [1.0, 2.0][rank], reduce="mean")
        state.record("total", [1.0, 2.0][rank], reduce="sum")
        got = reduce_metrics(state._take_metrics(), 2)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(got, f)
    """


def test_recorded_metrics_reduce_across_two_ranks(tmp_path):
    out = tmp_path / "got"
    run_two_ranks(tmp_path / "two_ranks.py", _TWO_RANKS, out, timeout=120)
    rank0, rank1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1))
    assert rank0["peak"] == rank1["peak"] == 7.0  # reduce="max": the max over the ranks
    assert rank0["avg"] == rank1["avg"] == 1.5 and rank0["total"] == rank1["total"] == 3.0
    assert (rank0["local"], rank1["local"]) == (0.0, 1.0)  # None: each rank's own value
    assert list(rank0) == ["local", "peak", "avg", "total"]  # recording order kept
