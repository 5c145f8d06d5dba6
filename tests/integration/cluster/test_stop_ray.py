"""Stopping an embedded Ray leaves no process behind: the monitor killed outright, the rest
(raylet, GCS, agents, workers with an actor) by Ray's own shutdown; and Ray starts again."""

from __future__ import annotations

import pytest
from fresh_python import run_fresh

pytestmark = pytest.mark.integration

STOP = """
import json, time
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
stop_ray()
deadline = time.monotonic() + 10
while time.monotonic() < deadline and any(running(p) for p in before):
    time.sleep(0.1)
alive = {p: n for p, n in before.items() if running(p)}
ensure_ray(num_cpus=1)
again = ray.is_initialized() and ray.get(ray.remote(lambda: 7).remote()) == 7
stop_ray()
print(json.dumps({"actor": pid, "before": len(before), "actor_seen": pid in before,
                  "alive": alive, "again": again}))
"""


def test_stop_ray_leaves_no_process_and_ray_starts_again() -> None:
    result = run_fresh(STOP)
    assert result["actor_seen"] and result["before"] >= 5  # gcs, raylet, monitor, agents...
    assert result["alive"] == {}
    assert result["again"]
