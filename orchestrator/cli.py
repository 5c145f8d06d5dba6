"""The `regimen` command.

Exit codes: 0 success, 2 bad input (recipe, arguments), 130 interrupted (Ctrl-C or
SIGTERM: open MLflow runs are marked KILLED), 1 anything else (a job that did not finish).
Errors are printed as one line each with the fix; no traceback unless
``REGIMEN_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from orchestrator.errors import RecipeError, RegimenError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Regimen: YAML training recipes -> DeepSpeed jobs on Ray, tracked in MLflow.",
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides such as optimizer.lr=3e-4.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Show Ray's, MLflow's, ... log lines too (always in the run's logs/driver.log).",
    ),
]


def _load(recipe: Path, overrides: list[str] | None) -> Any:
    from orchestrator.recipe.expand import expand
    from orchestrator.recipe.loader import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    return loaded, expand(loaded)


def _preflight(variants: list[Any]) -> None:
    """Tokenizer and data checks (they load the tokenizer: only for recipes that use one)."""
    recipes = [v.recipe for v in variants]
    if any(r.uses_tokenizer for r in recipes):
        from orchestrator.data.preflight import check_recipes

        check_recipes(recipes)


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe (and every sweep variant); print every problem with its fix."""
    _, variants = _load(recipe, overrides)
    _preflight(variants)
    out.print(f"{recipe}: valid ({len(variants)} variant{'s' if len(variants) != 1 else ''})")


@app.command()
def plan(recipe: RecipeArg, overrides: OverridesArg = None, as_json: JsonOpt = False) -> None:
    """Show the variants and each one's step schedule, without training."""
    from orchestrator.recipe.plan import plan_of

    _, variants = _load(recipe, overrides)
    plans = [plan_of(v) for v in variants]
    if as_json:
        print(json.dumps({"recipe": str(recipe), "variants": plans}, default=str))
        return
    from orchestrator.recipe.plan import render_plan

    for p in plans:
        out.print(render_plan(p))


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (point your editor's YAML plugin at it)."""
    from orchestrator.recipe.schema import Recipe

    print(json.dumps(Recipe.model_json_schema(), indent=2))


@app.command()
def run(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    as_json: JsonOpt = False,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address; default: an embedded local Ray.")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train a recipe (every sweep variant) on Ray; MLflow records everything."""
    from orchestrator.control.controller import run_variants
    from orchestrator.timeline import PROCESS, PROCESS_START, process_start_time

    PROCESS.mark(PROCESS_START, at=process_start_time())
    loaded, variants = _load(recipe, overrides)
    PROCESS.mark("driver.recipe")
    with _library_log(verbose, "run") as chatter:
        with _Progress(enabled=not as_json and sys.stderr.isatty()) as progress:
            results = run_variants(
                variants, recipe_name=loaded.recipe.name, address=address,
                on_progress=progress.update,
                max_concurrent=loaded.recipe.sweep.max_concurrent if loaded.recipe.sweep else None,
            )  # fmt: skip
        logs = chatter.keep_in(r.run_dir for r in results)
    for r in results:
        _status_line(r)
    _closing(results, variants[0].recipe.tracking.uri, logs, chatter)
    if as_json:
        summary = results[0].to_json() if len(results) == 1 else _sweep_summary(results)
        print(json.dumps(summary, default=str))
    if any(r.status != "FINISHED" for r in results):
        raise typer.Exit(1)


def _library_log(verbose: bool, command: str) -> Any:
    """The libraries' log lines into a capture file (and, ``verbose``, the terminal) while
    ``command`` runs (orchestrator.screen)."""
    from orchestrator.screen import LibraryLog

    return LibraryLog(verbose=verbose, title=f"regimen {command}")


def _status_line(r: Any, continues: str | None = None) -> None:
    style = "green" if r.status == "FINISHED" else "red"
    err.print(
        f"[{style}]{r.status}[/] {r.variant}: steps={r.steps} loss={_fmt(r.final_loss)} "
        f"rollbacks={r.rollbacks} run={r.run_id}"
        + (f" (continues {continues})" if continues else "")
        + (f"\n  error: {r.error}" if r.error else ""),
        soft_wrap=True,
    )


def _closing(results: list[Any], tracking_uri: str, logs: list[Path], chatter: Any) -> None:
    """The last lines: where to look at what ran in the store ``tracking_uri``
    (orchestrator.screen.closing_lines)."""
    import dataclasses

    from orchestrator.recipe.jobspec import absolute_tracking_uri
    from orchestrator.screen import Job, closing_lines

    by_dir = {str(p.parents[1]): str(p) for p in logs}  # <run dir>/logs/driver.log
    jobs = [
        dataclasses.replace(j, logs=[by_dir[j.run_dir]] if j.run_dir in by_dir else [])
        for j in map(Job.of, results)
    ]
    default = absolute_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    leftover = str(chatter.path) if chatter.path and not logs else None
    uri = absolute_tracking_uri(tracking_uri)
    for line in closing_lines(jobs, uri, default_uri=default, log_file=leftover):
        err.print(line, markup=False, highlight=False, soft_wrap=True)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _sweep_summary(results: list[Any]) -> dict[str, Any]:
    ok = all(r.status == "FINISHED" for r in results)
    return {
        "run_id": None,
        "status": "FINISHED" if ok else "FAILED",
        "steps": sum(r.steps for r in results),
        "final_loss": None,
        "rollbacks": sum(r.rollbacks for r in results),
        "checkpoint": None,
        "parent_run_id": next((r.parent_run_id for r in results if r.parent_run_id), None),
        "variants": [r.to_json() for r in results],
    }


class _Progress:
    """A rich progress bar per job (step, loss, ETA), fed by the controller's polling."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                TimeRemainingColumn(),
                console=err,
            )
            self.bar.__enter__()
        return self

    def update(self, name: str, progress: dict[str, Any]) -> None:
        if not self.enabled or not progress:
            return
        if name not in self.tasks:
            self.tasks[name] = self.bar.add_task(name, total=progress.get("total"), loss="-")
        self.bar.update(
            self.tasks[name], completed=progress.get("step", 0), loss=_fmt(progress.get("loss"))
        )

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(None, None, None)


TrackingOpt = Annotated[
    str, typer.Option("--tracking-uri", help="MLflow tracking URI holding the run.")
]


def _continue(
    run_id: str, tracking_uri: str, as_json: bool, address: str | None, verbose: bool, **kw: Any
) -> None:
    from orchestrator.control.resume import continue_run

    with _library_log(verbose, "rollback" if kw else "resume") as chatter:
        r = continue_run(run_id, tracking_uri=tracking_uri, address=address, **kw)
        logs = chatter.keep_in([r.run_dir])
    _status_line(r, continues=run_id)
    _closing([r], tracking_uri, logs, chatter)
    if as_json:
        print(json.dumps({**r.to_json(), "parent_run_id": run_id}, default=str))
    if r.status != "FINISHED":
        raise typer.Exit(1)


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of the job to continue.")],
    tracking_uri: TrackingOpt = "sqlite:///mlflow.db",
    as_json: JsonOpt = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Continue a stopped, failed or killed run from its last committed checkpoint (new run)."""
    _continue(run_id, tracking_uri, as_json, address, verbose)


@app.command()
def rollback(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of the job to roll back.")],
    to_step: Annotated[int, typer.Option("--to-step", help="Checkpoint at or before N.")],
    skip_batches: Annotated[
        int, typer.Option("--skip-batches", min=0, help="Global batches to skip from there.")
    ] = 0,
    lr_scale: Annotated[
        float | None, typer.Option("--lr-scale", min=0.0, help="Scale the LR from there on.")
    ] = None,
    tracking_uri: TrackingOpt = "sqlite:///mlflow.db",
    as_json: JsonOpt = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Start a new segment of a run from the checkpoint at or before --to-step."""
    _continue(
        run_id, tracking_uri, as_json, address, verbose, to_step=to_step,
        skip_batches=skip_batches, lr_scale=lr_scale,
    )  # fmt: skip


@app.command()
def export(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of the job to export.")],
    out_dir: Annotated[
        Path, typer.Argument(help="New (or empty) directory to write.", show_default=False)
    ],
    step: Annotated[
        int | None, typer.Option("--step", min=0, help="Checkpoint step; default: the newest.")
    ] = None,
    tracking_uri: TrackingOpt = "sqlite:///mlflow.db",
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Write a committed checkpoint of a run as a Hugging Face directory (save_pretrained)."""
    from orchestrator.control.export import export_run

    with _library_log(verbose, "export") as chatter:
        got = export_run(
            run_id, out_dir, tracking_uri=tracking_uri, step=step,
            on_progress=lambda line: err.print(f"export: {line}"),
        )  # fmt: skip
        logs = chatter.keep_in([got.get("run_dir")])
    err.print(f"[green]exported[/] run {run_id} step {got['step']} to {got['path']}")
    if logs or chatter.path:
        err.print(
            f"  logs        {logs[0] if logs else chatter.path}", markup=False, soft_wrap=True
        )
    if as_json:
        print(json.dumps(got))


from orchestrator.cluster import commands as _cluster  # noqa: E402

_cluster.register(app)  # submit, status, logs, stop, list

from orchestrator.audit import cli as _audit  # noqa: E402

_audit.register(app)  # audit


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning Regimen errors into clean messages and exit codes."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    try:
        # Outside standalone mode typer turns typer.Exit(N) and Ctrl-C into a return value (N,
        # 130) instead of exiting: the exit code is what app() returns.
        code = app(args=argv, standalone_mode=False)
    except RecipeError as exc:
        for problem in exc.problems:  # contract: FILE:LINE: dotted.key: message, one a line
            print(problem, file=sys.stderr)
        sys.exit(exc.exit_code)
    except RegimenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # outside a command (typer turns one inside into 130)
        code = 130
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2 if isinstance(exc, click.UsageError) else 1)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        if os.environ.get("REGIMEN_DEBUG") == "1":
            raise
        err.print(
            f"[red]error:[/] {type(exc).__name__}: {exc} (REGIMEN_DEBUG=1 shows the traceback)"
        )
        sys.exit(1)
    if code == 130:
        err.print("interrupted: the MLflow runs still open were marked KILLED")
    command = sys.argv[1] if argv is None and len(sys.argv) > 1 else None
    fast = bool(os.environ.get("REGIMEN_JOB_ID")) or command in FAST_EXIT_COMMANDS
    _finish(code if isinstance(code, int) else 0, fast=fast)


# commands whose process leaves without the interpreter's teardown (see _finish)
FAST_EXIT_COMMANDS = ("submit", "run", "resume", "rollback", "export")


def _finish(code: int, *, fast: bool) -> NoReturn:
    """Exit with ``code``; with ``fast``, skip the interpreter's teardown.

    ``fast`` is for a Ray job's driver (``REGIMEN_JOB_ID`` is set: a job started by
    ``regimen submit``) and for the commands of :data:`FAST_EXIT_COMMANDS` run as a
    process: it runs every exit handler but Ray's (the metric sink, MLflow, logging),
    flushes its output, stops Ray (:func:`~orchestrator.cluster.launch.stop_ray`: an
    embedded Ray's processes are killed, a connected driver disconnects; not Ray's exit
    handler, which sleeps 0.5 s "for log messages" that ``log_to_driver: False`` never
    sends) and leaves. Finalizing the modules of torch, DeepSpeed and Ray takes another
    1-2 s on a small node (0.6 s for the submitting client), and the job counts as ended
    (``submit --wait`` returns) only when its process is gone. Threads still running
    (none should be) keep the normal exit.
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if fast and not any(t.is_alive() and not t.daemon for t in others):
        import atexit

        worker_logs = os.environ.get("REGIMEN_WORKER_LOGS", "0") == "1"  # those need the sleep
        ray = sys.modules.get("ray") if not worker_logs else None
        if ray is not None:  # stopped last, below: nothing may see it die before the end
            atexit.unregister(ray.shutdown)
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        if ray is not None:
            from orchestrator.cluster.launch import stop_ray

            stop_ray(exiting=True)
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
