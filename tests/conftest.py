"""Shared fixtures: tiny recipes, an in-process gloo group, MLflow sqlite, a Ray session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore")
# the migrated MLflow store template new stores copy: the session's own, not the user's cache
os.environ.setdefault("REGIMEN_CACHE_DIR", tempfile.mkdtemp(prefix="regimen-test-cache-"))

REPO = Path(__file__).resolve().parents[1]

TINY_RECIPE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "model": {
        "kind": "hf_config",
        "architecture": "llama",
        "config": {
            "vocab_size": 256,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
        },
    },
    "data": {"kind": "stdlib_bytes", "seq_len": 32, "max_bytes": 200_000},
    "optimizer": {"name": "adamw", "lr": 3e-3},
    "schedule": {"steps": 8, "micro_batch_size": 4},
    "checkpoint": {"every": 4, "keep": 0},
    "resources": {"workers": 1},
}


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _session_members(sid: int) -> list[int]:
    """PIDs of the live processes in session ``sid`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            pids.append(int(entry.name))
    return pids


def kill_session(leader: subprocess.Popen[Any], timeout: float = 60.0) -> None:
    """SIGKILL every process of the session ``leader`` started (start_new_session=True) and
    wait until none is left: a node that dies takes its Ray workers with it, and they live
    in process groups of their own, so killpg(leader) alone leaves them running a while."""
    sid = leader.pid
    deadline = time.monotonic() + timeout
    while True:
        members = _session_members(sid)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=0.1)
        if not members:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {members} of session {sid} outlived SIGKILL")
        time.sleep(0.2)


def wait_for(predicate: Any, timeout: float, what: str, every: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def cli_exit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`regimen ARGV` in this process: its exit code, stdout and stderr."""
    from orchestrator.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    captured = capsys.readouterr()
    return int(exit_.value.code or 0), captured.out, captured.err


def tiny_recipe(tmp_path: Path, replace: dict[str, Any] | None = None, **sections: Any) -> Any:
    """A validated tiny Recipe; keyword sections are deep-merged over the defaults, the
    sections in ``replace`` (say, another model and its data) replace them whole."""
    from orchestrator.recipe.dotted import deep_merge
    from orchestrator.recipe.loader import load_recipe_data

    data = deep_merge({**TINY_RECIPE, **(replace or {})}, sections)
    data.setdefault("checkpoint", {}).setdefault("storage", str(tmp_path / "runs"))
    data.setdefault("tracking", {}).setdefault("uri", f"sqlite:///{tmp_path}/mlflow.db")
    return load_recipe_data(data, "<test>")


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated MLflow sqlite store, built once per session (migrations take ~3 s)."""
    from mlflow import MlflowClient

    fresh = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{fresh}").search_experiments()
    return fresh


@pytest.fixture
def mlflow_uri(tmp_path: Path, mlflow_template_db: Path) -> str:
    """A fresh MLflow sqlite store in tmp_path (a copy of the migrated template)."""
    shutil.copy(mlflow_template_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


def init_one_process_group(backend: str) -> None:
    """A torch.distributed world of one process (rank 0), unless one exists already.

    Never destroyed: DeepSpeed caches the world group, so a re-created one would not be
    the group it knows."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
    )
    dist.init_process_group(backend, rank=0, world_size=1)


def gpu_only() -> list[Any]:
    """The marks of a GPU test module: `gpu`, skipped cleanly without CUDA and
    DS_ACCELERATOR=cuda (run them with `DS_ACCELERATOR=cuda python -m pytest -m gpu tests/gpu`)."""
    import torch

    ready = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") == "cuda"
    return [
        pytest.mark.gpu,
        pytest.mark.skipif(
            not ready,
            reason="needs a CUDA device and DS_ACCELERATOR=cuda "
            "(DS_ACCELERATOR=cuda python -m pytest -m gpu tests/gpu)",
        ),
    ]


@pytest.fixture(scope="session")
def nccl_world() -> Iterator[None]:
    """A one-process NCCL group on device 0, as Ray Train sets up for a GPU worker."""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(0)
    init_one_process_group("nccl")
    if dist.get_backend() != "nccl":
        pytest.skip("this process already holds a non-NCCL group")
    yield


@pytest.fixture(scope="session")
def gloo_world() -> Iterator[None]:
    """A one-process torch.distributed group (gloo), as DeepSpeed needs one."""
    init_one_process_group("gloo")
    yield


# Pretraining steps of the test session's example model: fewer than the example's 300 (CPU
# time), enough that its held-out loss is well below the loss at init and it generates.
TINY_PRETRAINED_STEPS = 120


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/tiny_llama.py built once per session: ``model/`` (a pretrained tiny LLaMA with
    its BPE tokenizer and chat template) and ``data/`` (stdlib chat JSONL, held-out text)."""
    from examples.tiny_llama import build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama"), steps=TINY_PRETRAINED_STEPS, seed=0
    )


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One embedded local Ray for the whole session (starting Ray costs seconds)."""
    from orchestrator.cluster.launch import ensure_ray, stop_ray

    ensure_ray(num_cpus=2)
    yield
    stop_ray()
