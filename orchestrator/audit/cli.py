"""``regimen audit``: registered on the main app by :func:`register`.

Modes (one per call):

- ``regimen audit RUN_ID [--plot F.png] [--json]``: the report of one run and its lineage;
- ``regimen audit --compare RUN_A RUN_B ... [--plot F.png] [--json]``: recipe diff, metrics;
- ``regimen audit --experiment NAME [--sort KEY] [--json | --csv]``: a table of its runs;
- ``regimen audit --reconcile [--experiment NAME] [--stale-after S] [--dry-run]``: end
  RUNNING runs whose driver is gone (see :mod:`orchestrator.audit.reconcile`).

``--tracking-uri`` defaults to ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from orchestrator.errors import UsageError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def _check(
    run_ids: list[str],
    compare: bool,
    experiment: str | None,
    plot: Path | None,
    sort: str | None,
    as_json: bool,
    as_csv: bool,
    reconcile: bool,
) -> None:
    """Refuse flag combinations that mean nothing, naming the right usage."""
    if as_json and as_csv:
        raise UsageError("--json and --csv exclude each other: pick one")
    if reconcile:
        if run_ids or compare or plot or sort or as_csv:
            raise UsageError(
                "--reconcile takes only --experiment, --stale-after, --dry-run, --json"
            )
        return
    if experiment:
        if run_ids or compare or plot:
            raise UsageError(
                "--experiment lists runs; give either --experiment NAME or run ids, not both "
                "(--plot works with RUN_ID or --compare)"
            )
        return
    if sort or as_csv:
        raise UsageError("--sort and --csv apply to --experiment NAME tables")
    if compare and len(run_ids) < 2:
        raise UsageError(
            "--compare needs at least two run ids: regimen audit --compare RUN_A RUN_B"
        )
    if not compare and len(run_ids) != 1:
        raise UsageError(
            "give one RUN_ID (or --compare RUN_A RUN_B ..., --experiment NAME, --reconcile)"
        )


def audit(
    run_ids: Annotated[
        list[str] | None, typer.Argument(help="Run id(s) to report on or compare.")
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Compare the runs given: recipe diff, metrics.")
    ] = False,
    experiment: Annotated[
        str | None, typer.Option("--experiment", help="List the runs of this experiment.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw loss curves into this image file.")
    ] = None,
    sort: Annotated[
        str | None, typer.Option("--sort", help="Table column to sort by; -KEY descending.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="The experiment table as CSV.")] = False,
    reconcile: Annotated[
        bool, typer.Option("--reconcile", help="End RUNNING runs whose driver is gone.")
    ] = False,
    stale_after: Annotated[
        float,
        typer.Option(
            "--stale-after", min=1.0, help="Heartbeat age (s) after which a remote driver is gone."
        ),
    ] = 300.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --reconcile: report, change nothing.")
    ] = False,
    tracking_uri: Annotated[
        str,
        typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI."),
    ] = "sqlite:///mlflow.db",
) -> None:
    """Audit experiments: a run's lineage and events, comparisons, tables; reconcile."""
    from orchestrator.audit import report as rep
    from orchestrator.audit import table as tbl
    from orchestrator.audit.fetch import connect

    ids = list(run_ids or [])
    _check(ids, compare, experiment, plot, sort, as_json, as_csv, reconcile)
    client = connect(tracking_uri)
    result: Any
    if reconcile:
        result = rep.reconcile_store(
            tracking_uri, client, experiment, stale_after_s=stale_after, dry_run=dry_run
        )
        if as_json:
            print(json.dumps({"reconciled": result}, default=str))
            return
        if not result:
            out.print("no RUNNING runs")
        for r in result:
            verb = "ended KILLED" if r["ended"] else ("stale" if r["stale"] else "alive")
            out.print(f"{r['run_id']} {r['name']}: {verb}: {r['reason']}")
        return
    if experiment:
        columns, table = rep.experiment_table(tracking_uri, client, experiment, sort=sort)
        if as_json:
            print(tbl.to_json(columns, table))
        elif as_csv:
            print(tbl.to_csv(columns, table), end="")
        else:
            for line in tbl.to_text(columns, table):
                out.print(line)
        return
    plot_path = str(plot) if plot else None
    if compare:
        result = rep.compare_report(tracking_uri, client, ids, plot=plot_path)
        if as_json:
            print(json.dumps({k: v for k, v in result.items() if k != "text"}, default=str))
            return
        for line in result["text"]:
            out.print(line)
        if "plot" in result:
            out.print(f"\nplot: {result['plot']['path']}")
        return
    result = rep.run_report(tracking_uri, client, ids[0], plot=plot_path)
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != "lineage_text"}, default=str))
        return
    for line in rep.render_report(result):
        out.print(line, markup=False)


def register(app: typer.Typer) -> None:
    """Add ``audit`` to the ``regimen`` app."""
    app.command("audit")(audit)
