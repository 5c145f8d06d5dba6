"""A real Ray cluster for tests: ``ray start --head`` (and optionally a second node) in a
temp dir of its own, with token authentication on, torn down by pid.

The token is made for the cluster and passed as ``RAY_AUTH_TOKEN``, so
``~/.ray/auth_token`` is never touched. Teardown kills exactly the processes of this
cluster (found by its temp dir and GCS port), never every Ray on the machine. Every wait
is bounded.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from conftest import REPO, free_port


@dataclass
class Cluster:
    """Where a test cluster listens and the environment its clients need."""

    gcs: str
    url: str
    token: str
    env: dict[str, str]
    root: Path
    temp_dir: Path  # the cluster's Ray temp dir: session_latest/logs holds its logs


def ray_cli(args: list[str], env: dict[str, str], tries: int = 2) -> None:
    """``ray start``, retried once: on a loaded 2-core machine node startup can time out."""
    for attempt in range(tries):
        proc = subprocess.run(
            [shutil.which("ray") or "ray", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        if proc.returncode == 0:
            return
        if attempt + 1 < tries and "timed out during startup" in proc.stderr + proc.stdout:
            time.sleep(5)
            continue
        raise AssertionError(proc.stdout[-2000:] + proc.stderr[-3000:])


def kill_cluster(temp_dir: Path, gcs_port: int) -> None:
    """Terminate this cluster's processes (and their children) by pid; its clients, such
    as a `regimen run --address` driver, are left to find out the cluster is gone."""
    marks = (str(temp_dir), f":{gcs_port}")
    roots = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if "orchestrator.cli" in cmd:  # a client of the cluster (a driver), not part of it
            continue
        if p.pid != os.getpid() and any(m in cmd for m in marks):
            roots.append(p)
    procs = {p.pid: p for p in roots}
    for p in roots:
        with contextlib.suppress(psutil.Error):
            procs.update({c.pid: c for c in p.children(recursive=True)})
    procs.pop(os.getpid(), None)
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _ports() -> list[str]:
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
    ]


@contextlib.contextmanager
def ray_cluster(
    root: Path,
    second_node: bool = False,
    cpus: int = 2,
    second_node_env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """A head node (and a second node with the custom resource ``second_node``, whose Ray
    processes, workers included, also see ``second_node_env``), up for the ``with`` block
    and killed after it."""
    temp_dir = Path("/tmp") / f"rgm-{secrets.token_hex(3)}"  # short: unix socket paths
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        REGIMEN_DEBUG="1",  # forwarded to jobs: a failure shows its traceback in the logs
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        PYTHONPATH=str(REPO),
        RAY_USAGE_STATS_ENABLED="0",
    )
    gcs_port, dash_port = free_port(), free_port()
    try:
        ray_cli(
            [
                "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
                "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--num-cpus={cpus}",
                f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}",
                "--disable-usage-stats", *_ports(),
            ],
            env,
        )  # fmt: skip
        if second_node:
            ray_cli(
                [
                    "start", f"--address=127.0.0.1:{gcs_port}", f"--num-cpus={cpus}",
                    '--resources={"second_node": 1}', "--disable-usage-stats", *_ports(),
                ],
                {**env, **(second_node_env or {})},
            )  # fmt: skip
        yield Cluster(
            f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", token, env, root, temp_dir
        )
    finally:
        kill_cluster(temp_dir, gcs_port)
        shutil.rmtree(temp_dir, ignore_errors=True)
