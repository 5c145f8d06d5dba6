"""`data.kind: dataset` through the real Trainer (in process, world 1): a tiny hf_config llama
learns a chat dataset with the run's own tokenizer, and continual stages each name one."""

from __future__ import annotations

from pathlib import Path

import pytest
from text_kit import build_tokenizer, chat_records, write_jsonl

from conftest import tiny_recipe
from orchestrator.engine.loop import Trainer, WorkerContext
from orchestrator.engine.trainer import StepHook

pytestmark = pytest.mark.integration

LLAMA = {
    "kind": "hf_config", "architecture": "llama",
    "config": {"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 256},
}  # fmt: skip


class Losses(StepHook):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.losses.append(metrics["loss"])


def test_a_tiny_llama_learns_a_chat_dataset(tmp_path: Path, gloo_world) -> None:
    tok = build_tokenizer(tmp_path / "tok")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(64))
    recipe = tiny_recipe(
        tmp_path,
        replace={
            "model": {**LLAMA, "tokenizer": str(tok)},
            "data": {"kind": "dataset", "paths": [str(data)], "format": "chat", "seq_len": 128,
                     "eval_fraction": 0.1, "cache_dir": str(tmp_path / "cache")},
        },
        schedule={"steps": 30, "micro_batch_size": 4},
        checkpoint={"every": 0},
    )  # fmt: skip
    hook = Losses()
    summary = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"), step_hooks=[hook]).run()
    first, last = sum(hook.losses[:5]) / 5, sum(hook.losses[-5:]) / 5
    assert last < first - 1.0, hook.losses  # from ~ln(400) = 6.0
    assert summary["eval_loss"] < first


def test_continual_stages_each_name_a_dataset(tmp_path: Path, gloo_world) -> None:
    tok = build_tokenizer(tmp_path / "tok")
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))
    qa = write_jsonl(
        tmp_path / "qa.jsonl", [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(24)]
    )
    common = {"kind": "dataset", "seq_len": 96, "cache_dir": str(tmp_path / "cache")}
    recipe = tiny_recipe(
        tmp_path,
        replace={"model": {**LLAMA, "tokenizer": str(tok)},
                 "data": {**common, "paths": [str(chat)], "format": "chat"}},
        schedule={"steps": 8, "micro_batch_size": 2},
        checkpoint={"every": 0},
        continual={
            "stages": [
                {"name": "chat", "steps": 4},
                {"name": "qa", "steps": 4,
                 "data": {**common, "paths": [str(qa)], "format": "completion"}},
            ],
            "replay": {"size": 8, "policy": "task_balanced", "ratio": 0.5},
            "eval": {"every": 4, "subset_size": 2},
        },
    )  # fmt: skip
    summary = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run")).run()
    assert summary["steps"] == 8
    assert set(summary["continual"]["metrics"]) >= {"final_avg_loss", "bwt"}


def test_regimen_run_trains_a_dataset_from_relative_paths(tmp_path: Path) -> None:
    """The CLI on real Ray, 2 workers: relative data, tokenizer and cache paths (the workers
    run in Ray's directory) reach the workers, both ranks share one cache entry."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    from conftest import REPO

    build_tokenizer(tmp_path / "tok")
    write_jsonl(tmp_path / "data" / "chat.jsonl", chat_records(48))
    recipe = {
        "name": "sft-tiny", "seed": 0,
        "model": {**LLAMA, "tokenizer": "tok"},
        "data": {"kind": "dataset", "paths": ["data/*.jsonl"], "format": "chat", "seq_len": 128,
                 "eval_fraction": 0.1, "cache_dir": "cache"},
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "schedule": {"steps": 12, "micro_batch_size": 2},
        "checkpoint": {"every": 0, "storage": "./runs"},
        "resources": {"workers": 2},
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "sft"},
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", "r.yaml", "--json"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED" and summary["steps"] == 12
    assert summary["final_loss"] < 5.5  # from ~ln(400) = 6.0
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "arrow"]
    assert len(entries) == 1 and (entries[0] / "meta.json").exists()
