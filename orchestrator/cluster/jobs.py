"""Ray Jobs submission: ship a resolved recipe to a cluster and run ``regimen run`` there.

``submit`` writes the resolved recipe (extends and overrides applied) to a
temporary directory that becomes the job's ``runtime_env.working_dir``; when the
recipe names ``module:function`` factories, the user's top-level package travels
as ``py_modules``. The entrypoint is ``regimen run recipe.yaml --address auto``.
The job id is set by us (``regimen-<name>-<hex>``) and passed to the job as
``REGIMEN_JOB_ID``; the controller tags every MLflow run with ``regimen.job_id``,
so ``status`` can list each variant's run.

Token authentication (on by default for ``ray start --head`` in Ray 2.60): the
token comes from ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``,
or ``~/.ray/auth_token``, and is sent as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from orchestrator.errors import RegimenError, UsageError

FORWARDED_ENV = ("REGIMEN_DEBUG", "REGIMEN_WORKER_LOGS")  # never secrets: job env is visible
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
POLL_S = 0.25  # how often `submit --wait` and `logs --follow` read the job's state
JOB_TAG = "regimen.job_id"
TOKEN_FIX = (
    "set RAY_AUTH_TOKEN to the cluster's token (on the head node: `cat ~/.ray/auth_token` "
    "or `ray get-auth-token`), or copy it to ~/.ray/auth_token, or point RAY_AUTH_TOKEN_PATH "
    "at a file holding it"
)


class ClusterError(UsageError):
    """The cluster cannot be reached, refused our token, or does not know the job: exit 2."""


def auth_token() -> str | None:
    """The Ray auth token: ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        if path and Path(path).is_file():
            text = Path(path).read_text().strip()
            if text:
                return text
    return None


def _dashboard_url(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterError(
            "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard) "
            "or set RAY_ADDRESS"
        )
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def client(address: str | None) -> Any:
    """A connected ``JobSubmissionClient``; auth and connection failures become ``ClusterError``.

    One per dashboard URL and token in a process: making one asks the cluster for its
    version, and ``submit --wait`` reads the job's state several times a second.
    """
    from ray.job_submission import JobSubmissionClient

    url = _dashboard_url(address)
    token = auth_token()
    key = (url, token)
    if key in _CLIENTS:
        return _CLIENTS[key]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        made = JobSubmissionClient(url, headers=headers)
    except Exception as exc:
        raise _cluster_error(exc, url, token) from None
    _CLIENTS[key] = made
    return made


_CLIENTS: dict[tuple[str, str | None], Any] = {}


def _cluster_error(exc: BaseException, url: str, token: str | None) -> ClusterError:
    text = str(exc)
    name = type(exc).__name__
    if name == "AuthenticationError" or "401" in text[:80] or "403" in text[:80]:
        if token is None or "Missing" in text or "required" in text:
            return ClusterError(f"the Ray cluster at {url} requires an auth token: {TOKEN_FIX}")
        return ClusterError(
            f"the Ray cluster at {url} rejected the auth token (wrong token for this cluster): "
            f"{TOKEN_FIX}"
        )
    if isinstance(exc, ConnectionError) or "Failed to connect" in text or "onnection" in text:
        return ClusterError(
            f"cannot reach the Ray dashboard at {url}: check --address (the dashboard port, "
            "8265 by default, e.g. http://HEAD:8265) and that the cluster is running "
            "with the dashboard (ray[default], --include-dashboard=true)"
        )
    return ClusterError(f"Ray Jobs request to {url} failed: {name}: {text.splitlines()[0][:300]}")


def _call(c: Any, what: str, *args: Any) -> Any:
    try:
        return getattr(c, what)(*args)
    except RegimenError:
        raise
    except Exception as exc:
        text = str(exc)
        if "404" in text or "does not exist" in text or "not found" in text.lower():
            job = args[0] if args else "?"
            raise ClusterError(
                f"no job {job!r} on this cluster: `regimen list --address ...` shows the jobs"
            ) from None
        raise _cluster_error(exc, getattr(c, "_address", "?"), auth_token()) from None


# ---------------------------------------------------------------- submission


@dataclass
class Shipment:
    """What a submission carries: the runtime_env and the entrypoint."""

    entrypoint: str
    runtime_env: dict[str, Any]
    workdir: Path
    job_id: str


def _code_paths(recipe: Any, search: list[Path]) -> list[str]:
    """Local paths of the top-level packages/modules that the recipe's factories import."""
    specs = [
        s
        for s in (
            recipe.model.factory if recipe.model.kind == "factory" else None,
            recipe.data.factory if recipe.data.kind == "factory" else None,
        )
        if s
    ]
    paths: list[str] = []
    for spec in specs:
        top = spec.split(":", 1)[0].split(".", 1)[0]
        found = None
        for base in search:
            for candidate in (base / top, base / f"{top}.py"):
                if candidate.exists():
                    found = candidate
                    break
            if found:
                break
        if found is None:
            module = importlib.util.find_spec(top)
            origin = getattr(module, "origin", None) if module else None
            if origin and "site-packages" not in origin:
                found = Path(origin).parent if origin.endswith("__init__.py") else Path(origin)
            elif module is not None:
                continue  # an installed package: the cluster's image must have it
        if found is None:
            raise UsageError(
                f"factory {spec!r}: module {top!r} not found next to the recipe or in the "
                "current directory; run `regimen submit` from the directory holding it, "
                "or pass --py-module PATH"
            )
        if str(found.resolve()) not in paths:
            paths.append(str(found.resolve()))
    return paths


def prepare(
    recipe_path: Path,
    overrides: list[str] | None = None,
    *,
    py_modules: list[str] | None = None,
    pip: list[str] | None = None,
    env: dict[str, str] | None = None,
    entrypoint_extra: str = "",
) -> tuple[Shipment, Any, list[str]]:
    """Resolve and validate the recipe, stage it, and describe the job (no network)."""
    from orchestrator.recipe.expand import expand
    from orchestrator.recipe.loader import load_recipe

    if "DS_ACCELERATOR" in (env or {}):
        raise UsageError(
            "--env DS_ACCELERATOR: each worker chooses its accelerator from what Ray gave it "
            "(resources.gpus_per_worker > 0: cuda, else cpu); set gpus_per_worker instead"
        )
    loaded = load_recipe(recipe_path, overrides or [])
    variants = expand(loaded)  # validates every variant before anything is shipped
    recipe = loaded.recipe
    warnings = _portability_warnings(recipe)
    slug = recipe.name.lower().replace("_", "-").replace(".", "-")[:40]
    job_id = f"regimen-{slug}-{secrets.token_hex(4)}"
    workdir = Path(tempfile.mkdtemp(prefix="regimen-submit-"))
    (workdir / "recipe.yaml").write_text(loaded.yaml_text)
    modules = _code_paths(recipe, [recipe_path.resolve().parent, Path.cwd()])
    for extra in py_modules or []:
        if not Path(extra).exists():
            raise UsageError(f"--py-module {extra}: no such file or directory")
        modules.append(str(Path(extra).resolve()))
    runtime_env: dict[str, Any] = {
        "working_dir": str(workdir),
        "env_vars": {
            "REGIMEN_JOB_ID": job_id,
            "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",  # regimen's ray.init adds env_vars
            "RAY_JOB_STOP_WAIT_TIME_S": "20",  # SIGTERM grace: every run gets marked KILLED
            **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
            **(env or {}),
        },
    }
    if modules:
        runtime_env["py_modules"] = modules
    if pip:
        runtime_env["pip"] = list(pip)
    # Run from a private copy: the driver's own ray.init may re-extract the job's working_dir
    # (Ray replaces a cached working_dir on re-setup), deleting the directory under a cwd
    # that lives in it (FileNotFoundError from os.getcwd()). `exec` keeps SIGTERM direct.
    entrypoint = (
        'D="$(mktemp -d -t regimen-job-XXXXXX)" && cp recipe.yaml "$D/" && cd "$D" && '
        f"exec regimen run recipe.yaml --address auto --json {entrypoint_extra}"
    ).strip()
    shipment = Shipment(entrypoint, runtime_env, workdir, job_id)
    return shipment, variants, warnings


def _portability_warnings(recipe: Any) -> list[str]:
    out = []
    uri = recipe.tracking.uri
    path = uri.split("://", 1)[1] if uri.startswith(("sqlite:///", "file://")) else uri
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
    if ("://" not in uri or uri.startswith(("sqlite:", "file:"))) and not path.startswith("/"):
        out.append(
            f"tracking.uri {uri!r} is relative: on the cluster it resolves inside the job's "
            "temporary working directory. Use an MLflow server (http://...) or an absolute "
            "path on shared storage."
        )
    storage = recipe.checkpoint.storage
    if "://" not in storage and not storage.startswith("/"):
        out.append(
            f"checkpoint.storage {storage!r} is relative: checkpoints would stay in the job's "
            "temporary directory. Use shared storage (NFS path or s3://...)."
        )
    return out


def submit(
    address: str | None,
    recipe_path: Path,
    overrides: list[str] | None = None,
    *,
    py_modules: list[str] | None = None,
    pip: list[str] | None = None,
    entrypoint_num_cpus: float = 0.1,
    verbose: bool = False,
) -> tuple[str, Any, list[str]]:
    """Submit the recipe as a Ray job; returns (job id, variants, warnings). ``verbose``:
    the job's ``regimen run --verbose`` (Ray's and MLflow's lines in the job's log too)."""
    shipment, variants, warnings = prepare(
        recipe_path, overrides, py_modules=py_modules, pip=pip,
        entrypoint_extra="--verbose" if verbose else "",
    )  # fmt: skip
    c = client(address)
    recipe = variants[0].recipe
    metadata = {
        "regimen.recipe": recipe.name,
        "regimen.variants": str(len(variants)),
        "regimen.tracking_uri": recipe.tracking.uri,
        "regimen.experiment": recipe.tracking.experiment,
    }
    try:
        job_id = c.submit_job(
            entrypoint=shipment.entrypoint,
            submission_id=shipment.job_id,
            runtime_env=shipment.runtime_env,
            metadata=metadata,
            entrypoint_num_cpus=entrypoint_num_cpus,
        )
    except Exception as exc:
        raise _cluster_error(exc, c._address, auth_token()) from None
    finally:
        shutil.rmtree(shipment.workdir, ignore_errors=True)
    return job_id, variants, warnings


# ---------------------------------------------------------------- inspection


def info(address: str | None, job_id: str) -> Any:
    """The ``JobDetails`` of one job."""
    return _call(client(address), "get_job_info", job_id)


def jobs(address: str | None) -> list[Any]:
    """Every job the cluster knows, newest first."""
    found = _call(client(address), "list_jobs")
    return sorted(found, key=lambda j: j.start_time or 0, reverse=True)


def logs(address: str | None, job_id: str) -> str:
    """The job's whole log so far."""
    return str(_call(client(address), "get_job_logs", job_id))


def is_over(details: Any) -> bool:
    """True once Ray reports the job SUCCEEDED, FAILED or STOPPED."""
    return status_name(details) in TERMINAL


def follow(
    address: str | None, job_id: str, *, poll: float = POLL_S, timeout: float | None = None
) -> Iterator[str]:
    """Log chunks as the job writes them, until Ray reports it over (or ``timeout`` s pass).

    Ray's log tail closes its stream only seconds after the job ended (it re-reads the
    file once a second until it has met its end twice more), so the job's state is read
    every ``poll`` seconds alongside. Once the job is over, what the tail has not
    delivered yet is read in one request (the chunks are the log file in order, so it is
    the log past their length) and the iterator ends.
    """
    import asyncio

    c = client(address)
    _call(c, "get_job_info", job_id)
    agen = c.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    shown = 0  # characters of the log yielded so far
    pending: Any = None  # the tail's next chunk, being awaited
    tailing = True
    checked = time.monotonic()
    end = None if timeout is None else checked + timeout
    try:
        while True:
            if tailing and pending is None:
                pending = loop.create_task(agen.__anext__())
            if pending is not None:
                loop.run_until_complete(asyncio.wait({pending}, timeout=poll))
            else:
                time.sleep(poll)
            if pending is not None and pending.done():
                task, pending = pending, None
                try:
                    chunk = task.result()
                except StopAsyncIteration:
                    return  # Ray closes the tail after the job's end: that was the whole log
                except Exception:
                    tailing = False  # a broken stream: keep polling, fetch the log at the end
                else:
                    shown += len(chunk)
                    yield chunk
                if time.monotonic() - checked < poll:
                    continue
            checked = time.monotonic()
            if is_over(_call(c, "get_job_info", job_id)):
                rest = str(_call(c, "get_job_logs", job_id))[shown:]
                if rest:
                    yield rest
                return
            if end is not None and checked > end:
                return
    finally:
        if pending is not None:
            pending.cancel()
            loop.run_until_complete(asyncio.gather(pending, return_exceptions=True))
        with contextlib.suppress(Exception):
            loop.run_until_complete(agen.aclose())
        loop.close()


def stop(address: str | None, job_id: str) -> bool:
    """Ask Ray to stop the job (SIGTERM to the driver; the controller marks runs KILLED)."""
    c = client(address)
    _call(c, "get_job_info", job_id)
    return bool(_call(c, "stop_job", job_id))


def wait(
    address: str | None, job_id: str, timeout: float | None = None, poll: float = POLL_S
) -> Any:
    """Poll until the job is terminal (or ``timeout`` seconds pass); returns its details."""
    c = client(address)
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        details = _call(c, "get_job_info", job_id)
        if is_over(details):
            return details
        if end is not None and time.monotonic() > end:
            return details
        time.sleep(poll)


def status_name(details: Any) -> str:
    """``SUCCEEDED`` etc. from a JobDetails."""
    return str(getattr(details.status, "value", details.status))


def _sqlite_ready(path: str) -> bool:
    """True when the job has finished creating the MLflow schema in this sqlite file.

    Opening an MLflow client on a store whose tables are still being created would
    create them too, racing the job (and failing it on a duplicate table).
    """
    import sqlite3

    if not Path(path).exists():
        return False
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2) as db:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
        return bool(row) and row[0] == _get_latest_schema_revision()
    except Exception:
        return False


def mlflow_runs(details: Any) -> list[dict[str, Any]]:
    """The MLflow runs of a job (found by the ``regimen.job_id`` tag), parent first.

    Empty when the tracking URI stored at submission is not reachable from here.
    """
    meta = details.metadata or {}
    uri = meta.get("regimen.tracking_uri")
    if not uri:
        return []
    if uri.startswith("sqlite:///") and not _sqlite_ready(uri[len("sqlite:///") :]):
        return []
    try:
        from orchestrator.tracking.client import mlflow_client

        c = mlflow_client(uri)
        exp = c.get_experiment_by_name(meta.get("regimen.experiment", "regimen"))
        if exp is None:
            return []
        found = c.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{details.submission_id}'"
        )
    except Exception:
        return []
    closed = _close_orphaned_runs(uri, details, found)
    rows = [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "status": closed.get(r.info.run_id, r.info.status),
            "role": r.data.tags.get("regimen.role", "job"),
            "variant": r.data.tags.get("regimen.variant", ""),
            "steps": r.data.metrics.get("steps"),
            "final_loss": r.data.metrics.get("final_loss"),
            "start_time": r.info.start_time,
            "end_time": r.info.end_time,
        }
        for r in found
    ]
    rows.sort(key=lambda r: (r["role"] != "sweep", r["start_time"] or 0))
    return rows


# What a run left RUNNING becomes once Ray reports its job over (its driver can no longer end it).
_ORPHAN_STATUS: dict[str, Literal["FAILED", "KILLED"]] = {
    "STOPPED": "KILLED",
    "FAILED": "FAILED",
    "SUCCEEDED": "FAILED",
}


def _close_orphaned_runs(uri: str, details: Any, runs: list[Any]) -> dict[str, str]:
    """End the job's runs still RUNNING after Ray says the job is over.

    A stopped driver gets SIGTERM and then, after ``RAY_JOB_STOP_WAIT_TIME_S``, SIGKILL;
    on a loaded node it may be killed before it closes its runs. Ray's job status is
    the authority here, so the runs take the matching terminal status, with the reason
    in ``regimen.end_reason``. Returns run id -> the status it was given.
    """
    from orchestrator.tracking.runs import end_run

    job_status = status_name(details)
    status = _ORPHAN_STATUS.get(job_status)
    closed: dict[str, str] = {}
    if status is None:
        return closed
    for run in runs:
        if run.info.status != "RUNNING":
            continue
        reason = f"Ray job {details.submission_id} ended {job_status} with this run still open"
        try:
            end_run(uri, run.info.run_id, status, reason)
        except Exception:  # the listing must not fail because one run could not be closed
            continue
        closed[run.info.run_id] = status
    return closed


def job_json(details: Any) -> dict[str, Any]:
    """One job as plain JSON."""
    return {
        "job_id": details.submission_id,
        "status": status_name(details),
        "entrypoint": details.entrypoint,
        "message": details.message,
        "start_time": details.start_time,
        "end_time": details.end_time,
        "metadata": details.metadata or {},
    }


__all__ = [
    "ClusterError",
    "auth_token",
    "client",
    "follow",
    "info",
    "is_over",
    "jobs",
    "logs",
    "mlflow_runs",
    "prepare",
    "stop",
    "submit",
    "wait",
]
