"""The model taken home: export_model / export_checkpoint write a Hugging Face directory,
atomically; ZeRO-3 gathers; the logged model loads from MLflow. (That an export loads in a
fresh process: tests/integration/engine/test_export_processes.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_hf import IDS, build_tiny_hf, load_hf, load_logged_model, logits_of, trained

from orchestrator.engine.export import (
    EXPORT_RECORD,
    checkpoint_state_dict,
    export_checkpoint,
    export_model,
)
from orchestrator.errors import CheckpointError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf(tmp_path_factory.mktemp("tiny") / "model")


def test_a_failed_export_leaves_the_previous_one_whole(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    out = export_model(load_hf(tiny_dir), tmp_path / "export", str(tiny_dir), record={"step": 1})
    before = (out / EXPORT_RECORD).read_text()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk on fire")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(OSError, match="disk on fire"):
        export_model(trained(tiny_dir), out, str(tiny_dir), record={"step": 2})
    assert (out / EXPORT_RECORD).read_text() == before  # the old export, untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    monkeypatch.undo()
    export_model(trained(tiny_dir), out, str(tiny_dir), record={"step": 2})  # replaces it
    assert json.loads((out / EXPORT_RECORD).read_text())["step"] == 2


def test_tokenizer_dir_follows_the_model_section(tmp_path: Path) -> None:
    from conftest import tiny_recipe

    assert tiny_recipe(tmp_path).model.tokenizer_path is None  # hf_config, byte tokens
    pretrained = tiny_recipe(tmp_path, replace={"model": {"kind": "hf_pretrained", "path": "m"}})
    assert pretrained.model.tokenizer_path == "m"


def test_without_a_tokenizer_the_model_is_exported_alone(tmp_path: Path, tiny_dir: Path) -> None:
    out = export_model(load_hf(tiny_dir), tmp_path / "export", None)
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()


@pytest.mark.usefixtures("gloo_world")
def test_zero3_gathers_and_its_checkpoint_consolidates(tmp_path: Path, tiny_dir: Path) -> None:
    """ZeRO-3 (real DeepSpeed, one rank): the live export and the export of its checkpoint
    (DeepSpeed's zero_to_fp32, weights-only) both equal what the engine computes."""
    import deepspeed

    from conftest import tiny_recipe
    from orchestrator.engine.checkpoint import CheckpointStore

    model = load_hf(tiny_dir)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        config={
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        },
    )
    ids = torch.tensor([IDS])
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    assert all(p.numel() == 0 for p in engine.module.parameters())  # partitioned away
    expected = logits_of(engine)
    live = export_model(engine, tmp_path / "live", str(tiny_dir))
    assert torch.equal(logits_of(load_hf(live)), expected)
    assert not torch.equal(logits_of(load_hf(tiny_dir)), expected)  # it trained

    store = CheckpointStore(tmp_path / "ckpt", keep=0)
    info = store.save(engine, 1, {"step": 1})
    store.verify(info)
    store.scan_pickles(info)  # ZeRO-3's files pass the pickle scan
    recipe = tiny_recipe(
        tmp_path, replace={"model": {"kind": "hf_pretrained", "path": str(tiny_dir)}}
    )
    out = export_checkpoint(recipe, info, tmp_path / "from-ckpt")
    assert torch.equal(logits_of(load_hf(out)), expected)
    assert json.loads((out / EXPORT_RECORD).read_text())["step"] == 1
    assert (out / "tokenizer.json").is_file()  # model.path's tokenizer came along


def test_a_checkpoint_without_model_states_is_refused(tmp_path: Path) -> None:
    from orchestrator.engine.checkpoint import CheckpointInfo

    (tmp_path / "ds").mkdir()
    with pytest.raises(CheckpointError, match="no DeepSpeed model states"):
        checkpoint_state_dict(CheckpointInfo(3, tmp_path, {"files": {}}))


def test_the_logged_model_loads_back_from_mlflow(
    tmp_path: Path, tiny_dir: Path, mlflow_uri: str
) -> None:
    from mlflow.entities import LoggedModelStatus

    from orchestrator.tracking.client import mlflow_client
    from orchestrator.tracking.model import log_hf_model
    from orchestrator.tracking.runs import open_run

    out = export_model(trained(tiny_dir), tmp_path / "export", str(tiny_dir))
    secret = "hunter2-s3cr3t"
    run_id = open_run(
        mlflow_uri, "exp", "tiny", recipe={"tracking": {"password": secret}, "seed": 0}
    )
    model_id = log_hf_model(mlflow_uri, run_id, out, step=4, metrics={"loss": 1.25})
    client = mlflow_client(mlflow_uri)
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run_id and logged.status == LoggedModelStatus.READY
    assert {(m.key, m.value, m.step) for m in logged.metrics or []} == {("loss", 1.25, 4)}
    outputs = client.get_run(run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(model_id, 4)]
    assert secret not in json.dumps({**logged.params, **logged.tags})
    pipe = load_logged_model(mlflow_uri, model_id)
    assert torch.equal(logits_of(pipe.model), logits_of(load_hf(out)))
    text = pipe("def add", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("def add")


def test_without_a_tokenizer_mlflow_holds_the_directory(
    tmp_path: Path, tiny_dir: Path, mlflow_uri: str
) -> None:
    import mlflow

    from orchestrator.tracking.client import mlflow_client
    from orchestrator.tracking.model import log_hf_model
    from orchestrator.tracking.runs import open_run

    out = export_model(load_hf(tiny_dir), tmp_path / "export", None)
    run_id = open_run(mlflow_uri, "exp", "bytes")
    model_id = log_hf_model(mlflow_uri, run_id, out, step=2)
    logged = mlflow_client(mlflow_uri).get_logged_model(model_id)
    where = mlflow.artifacts.download_artifacts(logged.artifact_location, dst_path=tmp_path / "d")
    got = Path(where)
    assert (got / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert torch.equal(logits_of(load_hf(got)), logits_of(load_hf(out)))
