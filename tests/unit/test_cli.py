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
