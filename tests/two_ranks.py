"""Two real gloo ranks in processes of their own, for the tests that need a world of two.

A test writes the body of a script that defines ``worker(rank, *args)``; :func:`run_two_ranks`
adds what every such script repeats (the torch.distributed environment of each rank, its
gloo group, the ``mp.spawn`` footer), runs it and checks that both ranks returned.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO, free_port

_HEADER = """\
import os, sys
sys.path[:0] = {paths!r}
import torch.distributed as dist
import torch.multiprocessing as mp
"""

_FOOTER = """

def _rank(rank, port, *args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    worker(rank, *args)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_rank, args=(int(sys.argv[1]), *sys.argv[2:]), nprocs=2)
    print("ALL OK")
"""


def two_rank_script(body: str, paths: tuple[str | Path, ...] = ()) -> str:
    """The whole script: ``body`` (defining ``worker(rank, *args)``, the args as strings)
    between the set-up and the footer; ``paths`` go on sys.path after the repository."""
    return _HEADER.format(paths=[str(REPO), *map(str, paths)]) + textwrap.dedent(body) + _FOOTER


def run_two_ranks(
    script: Path,
    body: str,
    *args: str | Path,
    paths: tuple[str | Path, ...] = (),
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    timeout: float = 300,
) -> str:
    """Write :func:`two_rank_script` to ``script``, run ``worker(rank, *args)`` on two gloo
    ranks (DeepSpeed on the CPU) and return the output, once both ranks returned."""
    script.write_text(two_rank_script(body, paths))
    proc = subprocess.run(
        [sys.executable, str(script), str(free_port()), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", **(env or {})},
        cwd=cwd,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, out[-4000:]
    return out
