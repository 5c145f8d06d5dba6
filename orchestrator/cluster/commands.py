"""``regimen submit | status | logs | stop | list``: Ray Jobs from the command line.

Registered on the main app by :func:`register`. Every command takes
``--address`` (the Ray dashboard URL, e.g. ``http://HEAD:8265``; default
``$RAY_ADDRESS``) and reads the auth token as :mod:`orchestrator.cluster.jobs` says.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from orchestrator.cluster import jobs
from orchestrator.errors import RegimenError

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        envvar="RAY_ADDRESS",
        help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
JobArg = Annotated[str, typer.Argument(help="Job id (as printed by `regimen submit`).")]


# --wait looks the job's MLflow runs up at most this often while it streams the log (each
# look opens the tracking store; on a small machine that competes with the job itself)
ANNOUNCE_EVERY_S = 3.0


class JobFailed(RegimenError):
    """A waited-for job did not succeed: exit 1."""


def _when(ms: int | None) -> str:
    return "-" if not ms else datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def submit(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Overrides such as optimizer.lr=3e-4.")
    ] = None,
    address: AddressOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Stream logs until the job ends.")] = False,
    timeout: Annotated[
        float | None, typer.Option(help="With --wait: give up waiting after this many seconds.")
    ] = None,
    py_module: Annotated[
        list[str] | None,
        typer.Option("--py-module", help="Extra local package/module to ship (repeatable)."),
    ] = None,
    pip: Annotated[
        list[str] | None, typer.Option("--pip", help="pip requirement for the job (repeatable).")
    ] = None,
    as_json: JsonOpt = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="The job's `regimen run` shows Ray's, MLflow's, ... lines too."
        ),
    ] = False,
) -> None:
    """Submit a recipe to a Ray cluster (Ray Jobs); print the job id and the MLflow run."""
    job_id, variants, warnings = jobs.submit(
        address, recipe, overrides, py_modules=py_module, pip=pip, verbose=verbose
    )
    for w in warnings:
        err.print(f"[yellow]warning:[/] {w}")
    err.print(
        f"submitted [bold]{job_id}[/] ({len(variants)} variant"
        f"{'s' if len(variants) != 1 else ''}); follow: regimen logs {job_id} --follow"
    )
    if not wait:
        if as_json:
            print(json.dumps({"job_id": job_id, "status": "PENDING", "variants": len(variants)}))
        else:
            print(job_id)
        return
    shown: set[str] = set()
    announced = 0.0
    for chunk in jobs.follow(address, job_id, timeout=timeout):
        sys.stderr.write(chunk)
        sys.stderr.flush()
        if time.monotonic() - announced > ANNOUNCE_EVERY_S:
            with contextlib.suppress(jobs.ClusterError):  # the final report says it again
                _announce_runs(jobs.mlflow_runs(jobs.info(address, job_id)), shown)
            announced = time.monotonic()
    details = jobs.wait(address, job_id, timeout=30)
    state = jobs.status_name(details)
    runs = jobs.mlflow_runs(details)
    _announce_runs(runs, shown)
    if as_json:
        print(json.dumps({**jobs.job_json(details), "runs": runs}, default=str))
    else:
        print(job_id)
    err.print(f"job {job_id}: {state}" + (f" ({details.message})" if details.message else ""))
    if state != "SUCCEEDED":
        raise JobFailed(f"job {job_id} ended {state}: `regimen logs {job_id}` shows why")


def _announce_runs(runs: list[dict[str, Any]], shown: set[str]) -> None:
    for r in runs:
        if r["run_id"] not in shown:
            shown.add(r["run_id"])
            err.print(f"MLflow run {r['run_id']} ({r['role']}: {r['name']})")


def status(
    job: Annotated[str | None, typer.Argument(help="Job id; default: every job.")] = None,
    address: AddressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A job's state and each variant's MLflow run (or every job, without JOB)."""
    if job is None:
        list_jobs(address=address, as_json=as_json)
        return
    details = jobs.info(address, job)
    runs = jobs.mlflow_runs(details)
    if as_json:
        print(json.dumps({**jobs.job_json(details), "runs": runs}, default=str))
        return
    out.print(f"{job}: [bold]{jobs.status_name(details)}[/]  {details.message or ''}")
    out.print(f"  started {_when(details.start_time)}  ended {_when(details.end_time)}")
    for r in runs:
        steps = "-" if r["steps"] is None else str(int(r["steps"]))
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        out.print(
            f"  {r['role']:<5} {r['status']:<9} {r['variant'] or r['name'] or ''}  "
            f"steps={steps} loss={loss} run={r['run_id']}"
        )
    if not runs:
        out.print("  (no MLflow runs visible from here yet)")


def logs(
    job: JobArg,
    address: AddressOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream until the job ends.")
    ] = False,
) -> None:
    """Print a job's log (driver stdout/stderr)."""
    if follow:
        for chunk in jobs.follow(address, job):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        return
    sys.stdout.write(jobs.logs(address, job))


def stop(job: JobArg, address: AddressOpt = None) -> None:
    """Stop a running job; its MLflow runs end KILLED."""
    if jobs.stop(address, job):
        err.print(f"stopping {job}")
    else:
        err.print(f"{job} was not running ({jobs.status_name(jobs.info(address, job))})")


def list_jobs(address: AddressOpt = None, as_json: JsonOpt = False) -> None:
    """Every job on the cluster, newest first."""
    found = jobs.jobs(address)
    if as_json:
        print(json.dumps([jobs.job_json(j) for j in found], default=str))
        return
    for j in found:
        meta: dict[str, Any] = j.metadata or {}
        out.print(
            f"{j.submission_id or j.job_id or '?'}  {jobs.status_name(j):<9} "
            f"recipe={meta.get('regimen.recipe', '-')} "
            f"variants={meta.get('regimen.variants', '-')} "
            f"started={_when(j.start_time)} ended={_when(j.end_time)}"
        )
    if not found:
        out.print("(no jobs)")


deploy_app = typer.Typer(
    no_args_is_help=True, help="Generate deployment manifests from a recipe (KubeRay)."
)


@deploy_app.command("kuberay")
def deploy_kuberay(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Overrides such as resources.workers=4.")
    ] = None,
    kind: Annotated[str, typer.Option(help="rayjob (one-shot) or raycluster.")] = "rayjob",
    image: Annotated[str, typer.Option(help="Container image (see deploy/Dockerfile).")] = "",
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace.")] = "regimen",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """KubeRay ConfigMap + RayJob/RayCluster whose pods match the recipe's resources."""
    from orchestrator.cluster import manifests
    from orchestrator.errors import UsageError

    if kind not in ("rayjob", "raycluster"):
        raise UsageError(f"--kind {kind!r}: use rayjob or raycluster")
    text = manifests.from_recipe_file(
        str(recipe), overrides, kind=kind, image=image or manifests.DEFAULT_IMAGE,
        namespace=namespace,
    )  # fmt: skip
    if output:
        output.write_text(text)
        err.print(f"wrote {output} (kubectl apply -f {output})")
    else:
        sys.stdout.write(text)


def register(app: typer.Typer) -> None:
    """Add the cluster commands to the ``regimen`` app."""
    app.command()(submit)
    app.command()(status)
    app.command()(logs)
    app.command()(stop)
    app.command("list")(list_jobs)
    app.add_typer(deploy_app, name="deploy")
