"""Stopping an embedded Ray leaves no process behind: the monitor killed outright, the rest
(raylet, GCS, agents, workers with an actor) by Ray's own shutdown, and Ray starts again;
or, on the CLI's way out, every process of the cluster killed at once."""

from __future__ import annotations

import pytest
from fresh_python import run_fresh

pytestmark = pytest.mark.integration

STOP = """
import json, os, sys, time
import psutil, ray
from orchestrator.cluster.launch import ensure_ray, stop_ray

def running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

def ray_tree():
    return {p.pid: p.name() for p in psutil.Process().children(recursive=True)}

ensure_ray(num_cpus=1)
actor = ray.remote(num_cpus=0)(type("Echo", (), {"pid": lambda self: __import__("os").getpid()}))
pid = ray.get(actor.remote().pid.remote())
before = ray_tree()
exiting = sys.argv[1] == "exiting"
stop_ray(exiting=exiting)
deadline = time.monotonic() + 10
while time.monotonic() < deadline and any(running(p) for p in before):
    time.sleep(0.1)
alive = {p: n for p, n in before.items() if running(p)}
again = None
if not exiting:
    ensure_ray(num_cpus=1)
    again = ray.is_initialized() and ray.get(ray.remote(lambda: 7).remote()) == 7
    stop_ray()
print(json.dumps({"actor": pid, "before": len(before), "actor_seen": pid in before,
                  "alive": alive, "again": again}), flush=True)
if exiting:
    os._exit(0)
"""


def test_stop_ray_leaves_no_process_and_ray_starts_again() -> None:
    result = run_fresh(STOP, "shutdown")
    assert result["actor_seen"] and result["before"] >= 5  # gcs, raylet, monitor, agents...
    assert result["alive"] == {}
    assert result["again"]


def test_stop_ray_on_the_way_out_leaves_no_process() -> None:
    result = run_fresh(STOP, "exiting")
    assert result["actor_seen"] and result["before"] >= 5
    assert result["alive"] == {}
