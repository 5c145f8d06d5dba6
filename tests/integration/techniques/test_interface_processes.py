"""The interface across two real gloo ranks (two processes; moved from
tests/unit/techniques/test_interface.py: it takes seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import free_port

pytestmark = pytest.mark.integration


_TWO_RANKS = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def worker(rank, port, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
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
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
    """
)


def test_recorded_metrics_reduce_across_two_ranks(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    out = tmp_path / "got"
    subprocess.run(
        [sys.executable, str(script), str(free_port()), str(out)], check=True, timeout=120
    )
    rank0, rank1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1))
    assert rank0["peak"] == rank1["peak"] == 7.0  # reduce="max": the max over the ranks
    assert rank0["avg"] == rank1["avg"] == 1.5 and rank0["total"] == rank1["total"] == 3.0
    assert (rank0["local"], rank1["local"]) == (0.0, 1.0)  # None: each rank's own value
    assert list(rank0) == ["local", "peak", "avg", "total"]  # recording order kept
