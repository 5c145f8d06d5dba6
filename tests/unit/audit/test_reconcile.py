"""The reconcile rule: which RUNNING runs have lost their driver (fakes for host, pid, clock)."""

from __future__ import annotations

from orchestrator.audit.fetch import RunView
from orchestrator.audit.reconcile import Judgement, judge
from orchestrator.tracking.record import DRIVER_HOST, DRIVER_PID, DRIVER_STARTED, HEARTBEAT

NOW = 10_000.0


def _run(status: str = "RUNNING", **tags: str) -> RunView:
    return RunView(run_id="r", name="r", status=status, start_ms=1_000_000, tags=tags)


def _driver(host: str = "here", pid: str = "42", started: str = "500.0", beat: str = "9990"):
    return {DRIVER_HOST: host, DRIVER_PID: pid, DRIVER_STARTED: started, HEARTBEAT: beat}


def _judge(view: RunView, alive: dict[int, float], **kw: object) -> Judgement:
    return judge(view, now=NOW, host="here", pid_started=alive.get, **kw)  # type: ignore[arg-type]


def test_same_host_pid_gone_or_reused_is_stale() -> None:
    assert _judge(_run(**_driver()), {}).stale  # no such process
    reused = _judge(_run(**_driver()), {42: 777.0})
    assert reused.stale and "pid reused" in reused.reason
    alive = _judge(_run(**_driver()), {42: 500.4})
    assert not alive.stale and alive.alive_here


def test_other_host_uses_the_heartbeat_age() -> None:
    fresh = _run(**_driver(host="there", beat=str(NOW - 60)))
    old = _run(**_driver(host="there", beat=str(NOW - 1000)))
    assert not _judge(fresh, {}).stale
    verdict = _judge(old, {})
    assert verdict.stale and "1000 s" in verdict.reason and "there" in verdict.reason
    assert not _judge(old, {}, stale_after_s=2000).stale


def test_ended_untagged_and_segments() -> None:
    assert not _judge(_run("FINISHED", **_driver()), {}).stale
    untagged = _judge(_run(), {})
    assert not untagged.stale and "not judged" in untagged.reason
    seg = _run(**{"regimen.role": "segment"})
    assert _judge(seg, {}, parent=("KILLED", None)).stale
    assert _judge(seg, {}, parent=("RUNNING", Judgement(True, "gone"))).stale
    assert not _judge(seg, {}, parent=("RUNNING", Judgement(False, "alive"))).stale
