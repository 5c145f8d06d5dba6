"""The CLI's exit-code contract: 0 success, 1 a failed job, 2 bad input, 130 interrupted.

``run_variants`` is replaced by a fake here (no training): what is tested is how the entry
point turns outcomes into exit codes. The real paths are in tests/integration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import TINY_RECIPE
from orchestrator.cli import main
from orchestrator.control import controller
from orchestrator.control.controller import JobResult


def _exit_code(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    return int(exit_.value.code or 0), capsys.readouterr().err


@pytest.fixture
def recipe(tmp_path: Path) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(TINY_RECIPE))
    return str(path)


@pytest.mark.parametrize(("status", "code"), [("FINISHED", 0), ("FAILED", 1), ("KILLED", 1)])
def test_a_job_that_did_not_finish_exits_1(monkeypatch, capsys, recipe, status, code):
    def fake(variants: Any, **_: Any) -> list[JobResult]:
        return [JobResult(variant=v.name, run_id="r1", status=status) for v in variants]

    monkeypatch.setattr(controller, "run_variants", fake)
    got, err = _exit_code(capsys, "run", recipe, "--json")
    assert got == code and status in err


def test_interrupt_exits_130_with_a_message(monkeypatch, capsys, recipe):
    def interrupted(*_: Any, **__: Any) -> list[JobResult]:
        raise KeyboardInterrupt  # what SIGTERM turns into, too

    monkeypatch.setattr(controller, "run_variants", interrupted)
    got, err = _exit_code(capsys, "run", recipe)
    assert got == 130 and "interrupted" in err and "Traceback" not in err


def test_bad_input_exits_2(capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\nschedule: {stepz: 3}\n")
    got, err = _exit_code(capsys, "validate", str(tmp_path / "bad.yaml"))
    assert got == 2 and "bad.yaml:2" in err and "schedule.stepz" in err


def test_interrupt_outside_a_command_exits_130_too(monkeypatch, capsys):
    import orchestrator.cli as cli

    def interrupted(**_: Any) -> None:
        raise KeyboardInterrupt  # e.g. while typer parses the arguments

    monkeypatch.setattr(cli, "app", interrupted)
    got, err = _exit_code(capsys, "run", "x.yaml")
    assert got == 130 and "interrupted" in err


def _no_other_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads other tests left running in this process would (rightly) keep the normal exit."""
    import threading

    monkeypatch.setattr(threading, "enumerate", lambda: [threading.main_thread()])


@pytest.mark.parametrize(("status", "code"), [("FINISHED", 0), ("FAILED", 1)])
def test_a_ray_jobs_driver_exits_after_its_exit_handlers_without_teardown(
    monkeypatch, capsys, recipe, status, code
):
    """In a job from `regimen submit` the process leaves by os._exit once every exit
    handler ran (the job ends, and `submit --wait` returns, without the 1-2 s teardown of
    torch and Ray); elsewhere it exits normally (the test above)."""
    import atexit
    import os

    calls: list[str] = []

    def fake(variants: Any, **_: Any) -> list[JobResult]:
        return [JobResult(variant=v.name, run_id="r1", status=status) for v in variants]

    class Left(Exception):
        pass

    def fake_exit(got: int) -> None:
        calls.append(f"_exit {got}")
        raise Left

    monkeypatch.setattr(controller, "run_variants", fake)
    monkeypatch.setenv("REGIMEN_JOB_ID", "regimen-tiny-0001")
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: calls.append("handlers"))
    monkeypatch.setattr(os, "_exit", fake_exit)
    _no_other_threads(monkeypatch)
    with pytest.raises(Left):
        main(["run", recipe, "--json"])
    assert calls == ["handlers", f"_exit {code}"]


def test_a_ray_jobs_driver_runs_its_exit_handlers_and_flushes(tmp_path):
    """The real thing in a subprocess: piped stdout (buffered) arrives whole, and an exit
    handler registered by the command still runs."""
    import json
    import os
    import subprocess
    import sys

    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('handler ran', file=sys.stderr))\n"
        "from orchestrator.cli import main\n"
        "main(['schema'])\n"
    )
    env = {**os.environ, "REGIMEN_JOB_ID": "regimen-tiny-0001"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "properties" in json.loads(proc.stdout)
    assert "handler ran" in proc.stderr


def test_the_submit_command_leaves_without_teardown(monkeypatch, capsys, recipe):
    """`regimen submit` (the process's own command line, not an in-process call) also
    leaves by os._exit after its exit handlers: `--wait` returns 0.6 s sooner."""
    import atexit
    import os
    import sys

    from orchestrator.cluster import jobs

    calls: list[str] = []

    class Left(Exception):
        pass

    def fake_exit(got: int) -> None:
        calls.append(f"_exit {got}")
        raise Left

    monkeypatch.delenv("REGIMEN_JOB_ID", raising=False)
    monkeypatch.setattr(jobs, "submit", lambda *a, **k: ("job-1", [object()], []))
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: calls.append("handlers"))
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(sys, "argv", ["regimen", "submit", recipe, "--address", "http://x"])
    _no_other_threads(monkeypatch)
    with pytest.raises(Left):
        main()
    assert calls == ["handlers", "_exit 0"]
    assert capsys.readouterr().out.strip() == "job-1"
    calls.clear()
    with pytest.raises(SystemExit):  # the same command called in process exits normally
        main(["submit", recipe, "--address", "http://x"])
    assert calls == []


def test_a_thread_still_running_keeps_the_normal_exit(monkeypatch, capsys, recipe):
    """os._exit would kill a thread still at work; then the driver exits the normal way."""
    import atexit
    import os
    import threading

    def fake(variants: Any, **_: Any) -> list[JobResult]:
        return [JobResult(variant=v.name, run_id="r1", status="FINISHED") for v in variants]

    monkeypatch.setattr(controller, "run_variants", fake)
    monkeypatch.setenv("REGIMEN_JOB_ID", "regimen-tiny-0001")
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: pytest.fail("fast exit taken"))
    monkeypatch.setattr(os, "_exit", lambda code: pytest.fail("fast exit taken"))
    release = threading.Event()
    busy = threading.Thread(target=release.wait, daemon=False)
    busy.start()
    try:
        got, _ = _exit_code(capsys, "run", recipe, "--json")
    finally:
        release.set()
        busy.join()
    assert got == 0
