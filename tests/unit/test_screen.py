"""The quiet first screen (orchestrator/screen.py): library log routing and closing lines.

The real ``regimen run`` subprocess is in tests/integration/test_quiet_screen.py; here the
routing is checked against the real Ray and MLflow loggers (their own handlers installed
by importing them), and the CLI with a fake ``run_variants`` / ``continue_run``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import ray  # noqa: F401  (Ray's logger as in the driver: level INFO, its own stderr handler)
import yaml

from conftest import TINY_RECIPE
from orchestrator.cli import main
from orchestrator.control import controller, resume
from orchestrator.control.controller import JobResult
from orchestrator.errors import UsageError
from orchestrator.rundir import RunDir
from orchestrator.screen import Job, LibraryLog, audit_command, closing_lines, mlflow_view

RAY_LINE = "Started a local Ray instance."
MLFLOW_LINE = "Creating initial MLflow database tables..."


def _chatter() -> None:
    """What Ray and MLflow say on the driver as they start, through their own loggers."""
    logging.getLogger("ray._private.worker").info(RAY_LINE)
    logging.getLogger("ray._private.authentication").warning("Token authentication is enabled")
    logging.getLogger("mlflow.store.db.utils").info(MLFLOW_LINE)
    logging.getLogger("alembic.runtime.migration").warning("alembic says")
    logging.getLogger("DeepSpeed").warning("deepspeed says")  # its handler writes to stdout


def test_library_lines_go_to_the_capture_not_the_terminal(capfd):
    ray_own = list(logging.getLogger("ray").handlers)  # Ray's, bound to stderr at its import
    with LibraryLog() as log:  # Ray's and MLflow's own stderr handlers are real
        assert ray_own and not any(h in logging.getLogger("ray").handlers for h in ray_own)
        _chatter()
        warnings.warn("a library's FutureWarning", FutureWarning, stacklevel=1)
        logging.getLogger("orchestrator.control.controller").warning("MLflow unreachable")
        text = Path(str(log.path)).read_text()
    shown = capfd.readouterr()  # the file descriptors and sys.stdout/sys.stderr
    terminal = shown.out + shown.err
    for line in (RAY_LINE, "Token authentication", MLFLOW_LINE, "alembic says", "deepspeed"):
        assert line not in terminal
        assert line in text
    assert "FutureWarning" in text and "FutureWarning" not in terminal
    assert "warning: MLflow unreachable" in shown.err  # Regimen's own warnings stay
    assert log.path is not None and log.path.exists()  # kept nowhere: it stays


def test_verbose_shows_them_as_without_regimen_and_still_captures(capsys):
    ray_own = list(logging.getLogger("ray").handlers)  # Ray's, bound to stderr at its import
    assert ray_own
    with LibraryLog(verbose=True) as log:
        _chatter()
        text = Path(str(log.path)).read_text()
        assert all(h in logging.getLogger("ray").handlers for h in ray_own)
    err = capsys.readouterr().err
    assert MLFLOW_LINE in err and "mlflow.store.db.utils" in err  # MLflow's own format
    assert RAY_LINE in text and MLFLOW_LINE in text


def test_the_loggers_are_restored_and_the_capture_kept_in_each_run_dir(tmp_path, capsys):
    ray_logger = logging.getLogger("ray")
    before = (list(ray_logger.handlers), ray_logger.propagate)
    runs = [RunDir(tmp_path / "a").create(), RunDir(tmp_path / "b").create()]
    with LibraryLog(title="regimen run") as log:
        _chatter()
        # ray.init sets its format on every handler of the "ray" logger (setup_logger)
        for h in ray_logger.handlers:
            h.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s"))
        logging.getLogger("ray").info("after ray.init")
        kept = log.keep_in([runs[0].root, runs[1].root, None, tmp_path / "missing"])
        capture = log.path
    assert (list(ray_logger.handlers), ray_logger.propagate) == before
    assert kept == [r.driver_log for r in runs]
    assert capture is not None and not capture.exists()  # it lives on in the run dirs
    for r in runs:
        text = r.driver_log.read_text()
        assert text.startswith("=== regimen run (") and RAY_LINE in text and MLFLOW_LINE in text
        assert "INFO ray: after ray.init" in text  # the capture's format stayed
    with LibraryLog(title="regimen resume") as log:  # a resume appends a section
        logging.getLogger("ray").info("second command")
        log.keep_in([runs[0].root])
    text = runs[0].driver_log.read_text()
    assert text.index("=== regimen run") < text.index("=== regimen resume") < text.index("second")


def test_a_failed_command_says_where_the_capture_is(capsys):
    with pytest.raises(RuntimeError), LibraryLog() as log:
        _chatter()
        raise RuntimeError("boom")
    assert log.path is not None and f"the libraries' log (Ray, MLflow, ...): {log.path}" in (
        capsys.readouterr().err
    )
    log.path.unlink()


def test_mlflow_view_for_each_store(tmp_path):
    assert (
        mlflow_view("sqlite:////x/mlflow.db")
        == "mlflow ui --backend-store-uri sqlite:////x/mlflow.db"
    )
    store = tmp_path / "ml runs"  # a file store named by a plain path
    assert mlflow_view(str(store)) == f"mlflow ui --backend-store-uri {store.as_uri()}"
    assert "%20" in store.as_uri()
    assert (
        mlflow_view("https://bob:s3cret@mlflow.example:5000") == "open https://mlflow.example:5000"
    )
    assert "s3cret" not in audit_command(["r1"], "http://bob:s3cret@h:5000", "sqlite:////d")


def test_secrets_in_a_store_uri_query_are_not_printed():
    """A token or password in the tracking URI's query never reaches the screen; the
    store's other options stay (the printed command still opens the same store)."""
    uri = "postgresql://db:5432/ml?sslmode=require&password=s3cret&api_token=t0k"
    view = mlflow_view(uri)
    assert "s3cret" not in view and "t0k" not in view and "sslmode=require" in view
    assert mlflow_view("https://h:5000/?Auth=abc") == "open https://h:5000/"
    assert "abc" not in audit_command(["r1"], "https://h/?access_key=abc", "sqlite:////d")


def test_audit_names_the_store_only_when_it_is_not_the_default():
    assert audit_command(["r1"], "sqlite:////d/mlflow.db", "sqlite:////d/mlflow.db") == (
        "regimen audit r1"
    )
    assert audit_command(["a", "b"], "sqlite:////e.db", "sqlite:////d.db") == (
        "regimen audit --compare a b --tracking-uri sqlite:////e.db"
    )


def test_closing_lines_of_one_job_and_of_a_sweep():
    one = Job("tiny", "r1", "FINISHED", "/runs/r1/checkpoints/step-20", "/runs/r1/export",
              "/runs/r1", logs=["/runs/r1/logs/driver.log"])  # fmt: skip
    lines = closing_lines([one], "sqlite:////d/mlflow.db", default_uri="sqlite:////d/mlflow.db")
    assert lines == [
        "  MLflow      mlflow ui --backend-store-uri sqlite:////d/mlflow.db",
        "  audit       regimen audit r1",
        "  checkpoint  /runs/r1/checkpoints/step-20",
        "  model       /runs/r1/export",
        "  logs        /runs/r1/logs/driver.log",
    ]
    sweep = [
        Job("tiny-a", "r1", "FINISHED", "/c1", "/e1", "/runs/r1", "p0", ["/runs/r1/logs/d"]),
        Job("tiny-bb", "r2", "FAILED", None, None, "/runs/r2", "p0", ["/runs/r2/logs/d"]),
    ]
    lines = closing_lines(sweep, "sqlite:////d/mlflow.db", default_uri="sqlite:////d/mlflow.db")
    assert lines[1:4] == [
        "  sweep       parent run p0 (2 variants)",
        "  compare     regimen audit --compare r1 r2",
        "  tiny-a   FINISHED run r1  checkpoint /c1  model /e1",
    ]
    assert lines[4] == "  tiny-bb  FAILED   run r2  no checkpoint"
    assert lines[5].startswith("  logs        /runs/r1/logs/d (a copy in each")


# -- the CLI: the warnings that matter survive the quiet screen ---------------------------


@pytest.fixture
def recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    # the closing lines name --tracking-uri unless the store is audit's default; an earlier
    # test's mlflow.set_tracking_uri may have left MLFLOW_TRACKING_URI set in os.environ
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**TINY_RECIPE, "tracking": {"uri": "sqlite:///mlflow.db"}}))
    return str(path)


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    got = capsys.readouterr()
    return int(exit_.value.code or 0), got.out, got.err


def test_run_is_quiet_and_ends_with_where_to_look(monkeypatch, capsys, recipe, tmp_path):
    rd = RunDir(tmp_path / "runs" / "r1").create()

    def fake(variants: Any, **_: Any) -> list[JobResult]:
        _chatter()
        logging.getLogger("orchestrator.control.controller").warning("MLflow unreachable: spooled")
        return [JobResult(variant="tiny", run_id="r1", status="FINISHED", steps=8,
                          checkpoint=str(rd.checkpoints / "step-8"), run_dir=str(rd.root),
                          extra={"export": {"path": str(rd.export)}})]  # fmt: skip

    monkeypatch.setattr(controller, "run_variants", fake)
    code, out, err = _main(capsys, "run", recipe)
    assert code == 0 and out == ""
    assert RAY_LINE not in err and MLFLOW_LINE not in err
    assert "warning: MLflow unreachable: spooled" in err
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in err
    assert "regimen audit r1\n" in err
    assert f"checkpoint  {rd.checkpoints / 'step-8'}" in err and f"model       {rd.export}" in err
    assert f"logs        {rd.driver_log}" in err and RAY_LINE in rd.driver_log.read_text()


def test_run_verbose_shows_the_library_lines(monkeypatch, capsys, recipe):
    def fake(variants: Any, **_: Any) -> list[JobResult]:
        _chatter()
        return [JobResult(variant="tiny", run_id="r1", status="FINISHED")]

    monkeypatch.setattr(controller, "run_variants", fake)
    code, _, err = _main(capsys, "run", recipe, "--verbose")
    assert code == 0 and MLFLOW_LINE in err  # (Ray's handler writes to the stderr of its
    # import, outside capsys: the real terminal is in tests/integration/test_quiet_screen.py)


def test_a_gpu_recipe_on_a_cpu_only_machine_is_still_said(monkeypatch, capsys, recipe):
    from orchestrator.cluster.fit import check_variants

    def fake(variants: Any, **_: Any) -> list[JobResult]:
        _chatter()
        check_variants(variants, [{"CPU": 2.0, "memory": 8e9}])  # what a CPU-only Ray holds
        raise AssertionError("unreachable")

    monkeypatch.setattr(controller, "run_variants", fake)
    code, _, err = _main(capsys, "run", recipe, "resources.gpus_per_worker=1")
    assert code == 2 and "error:" in err and "GPU" in err and RAY_LINE not in err


def test_a_resume_that_found_no_checkpoint_is_still_said(monkeypatch, capsys):
    def fake(run_id: str, **_: Any) -> JobResult:
        _chatter()
        raise UsageError(f"run {run_id} has no committed checkpoint at all in /runs/x")

    monkeypatch.setattr(resume, "continue_run", fake)
    code, _, err = _main(capsys, "resume", "abc", "--tracking-uri", "sqlite:////tmp/none.db")
    assert code == 2 and "error: run abc has no committed checkpoint at all" in err
    assert RAY_LINE not in err and MLFLOW_LINE not in err


@pytest.mark.parametrize("verbose", [False, True])
def test_a_handler_a_library_adds_during_the_command_is_held_back(capsys, verbose):
    """DeepSpeed adds its stdout handler when imported, which may be mid-command."""
    name = "DeepSpeed"
    logger = logging.getLogger(name)
    before = list(logger.handlers)
    added = logging.StreamHandler(__import__("sys").stdout)  # what deepspeed's import does
    with LibraryLog(verbose=verbose) as log:
        logger.addHandler(added)
        logger.warning("Setting accelerator to CPU")
        text = Path(str(log.path)).read_text()
    shown = capsys.readouterr()
    assert "Setting accelerator to CPU" in text
    assert shown.out.count("Setting accelerator to CPU") == (1 if verbose else 0)
    assert "Setting accelerator" not in shown.err  # verbose: the library's own, not twice
    assert logger.handlers == [*before, added]  # the library's once the command ends
    logger.removeHandler(added)


def test_a_sweep_ends_with_its_parent_and_one_line_per_variant(
    monkeypatch, capsys, recipe, tmp_path
):
    dirs = [RunDir(tmp_path / "runs" / r).create() for r in ("r1", "r2")]

    def fake(variants: Any, **_: Any) -> list[JobResult]:
        _chatter()
        return [
            JobResult(
                variant=f"tiny-{i}",
                run_id=d.name,
                status="FINISHED",
                run_dir=str(d.root),
                checkpoint=str(d.checkpoints / "step-8"),
                parent_run_id="p0",
            )
            for i, d in enumerate(dirs)
        ]

    monkeypatch.setattr(controller, "run_variants", fake)
    code, out, err = _main(capsys, "run", recipe, "--json")
    assert code == 0 and '"parent_run_id": "p0"' in out  # --json: a field added, no more
    assert "  sweep       parent run p0 (2 variants)\n" in err
    assert "  compare     regimen audit --compare r1 r2\n" in err
    assert f"  tiny-0  FINISHED run r1  checkpoint {dirs[0].checkpoints / 'step-8'}\n" in err
    assert all(RAY_LINE in d.driver_log.read_text() for d in dirs)  # each variant's run dir
    assert RAY_LINE not in err


MLFLOW_IMPORTED_MID_COMMAND = """
import json, logging, os, sys, tempfile
from pathlib import Path
terminal = tempfile.TemporaryFile("w+")
os.dup2(terminal.fileno(), 2)  # the terminal: this process's stderr
from orchestrator.screen import LibraryLog
assert "mlflow" not in sys.modules
with LibraryLog(verbose=sys.argv[1] == "verbose") as log:
    import mlflow  # as the store-opening thread does, after the takeover
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    logging.getLogger("alembic.runtime.migration").info("alembic info stays below its level")
    captured = Path(str(log.path)).read_text()
    told = os.environ.get("MLFLOW_CONFIGURE_LOGGING")
sys.stderr.flush()
terminal.seek(0)
print(json.dumps({"captured": captured, "terminal": terminal.read(), "told": told,
                  "after": os.environ.get("MLFLOW_CONFIGURE_LOGGING")}))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_mlflow_imported_during_the_command_is_routed_too(verbose):
    """MLflow sets its loggers' handlers at import; imported after the takeover (off the
    driver's critical path), it is told not to, and its lines are still routed, at its
    own levels (INFO for mlflow, WARNING for alembic)."""
    from fresh_python import run_fresh

    out = run_fresh(MLFLOW_IMPORTED_MID_COMMAND, "verbose" if verbose else "quiet")
    assert out["told"] == "false" and out["after"] is None  # only while the command runs
    assert MLFLOW_LINE in out["captured"] and "alembic info" not in out["captured"]
    assert (MLFLOW_LINE in out["terminal"]) is verbose
    assert "alembic info" not in out["terminal"]
