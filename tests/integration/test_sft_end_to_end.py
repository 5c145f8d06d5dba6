"""Issue 14's end to end: `regimen run recipes/sft_lisa.yaml` (LISA, warmup, spike guard,
2 DeepSpeed workers on CPU) fine-tunes the example pretrained model on the stdlib chat
data. The held-out loss on the chat data falls, the exported model answers a prompt in a
fresh process, and MLflow holds the model next to the run. The recipe's paths point at the
session's `tiny_pretrained` example (built once, in pytest's tmp dir)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from conftest import REPO

pytestmark = pytest.mark.integration

# Assistant-token loss of a model on the eval chat file, and its answer to one question,
# computed with nothing but transformers (not Regimen's data pipeline).
_JUDGE = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

model_dir, tok_dir, eval_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
total, count = 0.0, 0
with torch.no_grad():
    for line in open(eval_file, encoding="utf-8"):
        messages = json.loads(line)["messages"]
        out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        ids = torch.tensor([out["input_ids"]])
        labels = torch.where(torch.tensor([out["assistant_masks"]]) == 1, ids, -100)
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
question = json.loads(open(eval_file, encoding="utf-8").readline())["messages"][:1]
pipe = pipeline("text-generation", model=model, tokenizer=tok)
reply = pipe(question, max_new_tokens=32, do_sample=False)[0]["generated_text"][-1]
print(json.dumps({"loss": total / count, "reply": reply["content"]}))
"""


def _python(*args: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _judge(model_dir: Path, tok_dir: Path, eval_file: Path, cwd: Path) -> dict:
    proc = _python("-c", _JUDGE, str(model_dir), str(tok_dir), str(eval_file), cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _is_save_pretrained_dir(path: Path) -> bool:
    """Config, safetensors weights and the tokenizer, as `save_pretrained` writes them."""
    return (
        (path / "config.json").exists()
        and any(path.glob("*.safetensors"))
        and (path / "tokenizer_config.json").exists()
    )


def _paths(tiny_pretrained: Path) -> list[str]:
    """Overrides that point the recipe at the session's example model and data."""
    data = tiny_pretrained / "data"
    return [
        f"model.path={tiny_pretrained / 'model'}",
        f"data.paths={json.dumps([str(data / 'stdlib_chat.jsonl')])}",
        f"data.eval_paths={json.dumps([str(data / 'stdlib_chat_eval.jsonl')])}",
    ]


def test_sft_lisa_recipe_validates_against_the_example(tiny_pretrained: Path) -> None:
    """`regimen validate` loads the recipe's tokenizer (the chat-template and pad checks), so
    it runs here, where the example is built, not in the no-torch test of recipes/."""
    proc = _python(
        "-m",
        "orchestrator.cli",
        "validate",
        str(REPO / "recipes" / "sft_lisa.yaml"),
        *_paths(tiny_pretrained),
        cwd=tiny_pretrained,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "valid (1 variant)" in " ".join(proc.stdout.split())  # rich wraps long lines


def test_sft_lisa_recipe_fine_tunes_exports_and_logs_the_model(
    tiny_pretrained: Path, tmp_path: Path, mlflow_uri: str
) -> None:
    model, data = tiny_pretrained / "model", tiny_pretrained / "data"
    eval_file = data / "stdlib_chat_eval.jsonl"
    storage = tmp_path / "runs"
    proc = _python(
        "-m",
        "orchestrator.cli",
        "run",
        str(REPO / "recipes" / "sft_lisa.yaml"),
        "--json",
        *_paths(tiny_pretrained),
        f"data.cache_dir={tmp_path / 'data-cache'}",
        f"checkpoint.storage={storage}",
        f"tracking.uri={mlflow_uri}",
        cwd=tmp_path,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED" and summary["steps"] == 60
    run_id = summary["run_id"]

    # held-out loss on the chat data falls, as the run measured it ...
    client = mlflow.MlflowClient(mlflow_uri)
    evals = [
        m.value
        for m in sorted(client.get_metric_history(run_id, "eval_loss"), key=lambda m: m.step)
    ]
    assert len(evals) >= 2 and evals[-1] < evals[0], evals
    assert client.get_metric_history(run_id, "lisa/active_mask")  # LISA ran

    # ... and as transformers measures it on the exported model, against the pretrained one
    export = summary["export"]
    exported = Path(export["path"])
    assert exported == storage / run_id / "export"
    assert _is_save_pretrained_dir(exported), sorted(p.name for p in exported.iterdir())
    before = _judge(model, model, eval_file, tmp_path)
    after = _judge(exported, exported, eval_file, tmp_path)
    assert after["loss"] < before["loss"] - 0.3, (before, after)
    assert after["reply"].strip()  # the exported model answers a prompt

    # MLflow holds the model next to the run: a logged model of this run, with the weights
    logged = client.get_logged_model(export["model_id"])
    assert logged.source_run_id == run_id
    where = mlflow.artifacts.download_artifacts(
        artifact_uri=logged.artifact_location,
        dst_path=str(tmp_path / "from-mlflow"),
        tracking_uri=mlflow_uri,
    )
    assert list(Path(where).rglob("config.json")), f"no model in MLflow for run {run_id}"
    assert list(Path(where).rglob("*.safetensors"))
