"""Export round trip with two real ranks (DeepSpeed, gloo, two processes): the run's final
model equals the trained engine in fp32 at ZeRO-1 and ZeRO-2, loads in a fresh process and
generates; `regimen export RUN_ID --step N` equals that checkpoint's weights (also when only
the storage mirror still holds it); the model is in MLflow, linked to the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_hf import (
    IDS,
    build_tiny_hf,
    fresh_process_load,
    load_hf,
    load_logged_model,
    logits_of,
    trained,
)
from two_ranks import run_two_ranks

from conftest import tiny_recipe

pytestmark = pytest.mark.integration


_TWO_RANKS = """
    import json
    import torch
    from pathlib import Path

    def worker(rank, recipe_file, run_dir, uri, run_id, out):
        from orchestrator.engine.trainer import StepHook, Trainer, WorkerContext
        from orchestrator.recipe.loader import load_recipe_text

        class AtStep2(StepHook):  # the weights checkpoint 2 holds, independently of it
            def after_step(self, trainer, metrics):
                if trainer.state.step == 2 and rank == 0:
                    sd = {k: v.detach().clone() for k, v in
                          trainer.built.engine.module.state_dict().items()}
                    torch.save(sd, f"{out}/step2.pt")

        recipe = load_recipe_text(Path(recipe_file).read_text(), name="recipe.yaml")
        ctx = WorkerContext(Path(run_dir), rank, 2, uri, run_id)
        trainer = Trainer(recipe, ctx, step_hooks=[AtStep2()])
        summary = trainer.run()
        if rank == 0:
            engine = trainer.built.engine
            engine.eval()
            with torch.no_grad():
                logits = engine(input_ids=torch.tensor([json.loads(os.environ["IDS"])])).logits
            torch.save(logits, f"{out}/engine_logits.pt")
            Path(f"{out}/summary.json").write_text(json.dumps(summary["export"]))
        dist.barrier()
    """


def _run(tmp_path: Path, stage: int, storage: str) -> tuple[Any, dict[str, Any], Path]:
    """Train 4 steps on two ranks (checkpoints at 2 and 4); (recipe, export info, out dir)."""
    from orchestrator.control.controller import open_job_run
    from orchestrator.recipe.jobspec import JobSpec

    model_dir = build_tiny_hf(tmp_path / "pretrained")
    recipe = tiny_recipe(
        tmp_path,
        replace={"model": {"kind": "hf_pretrained", "path": str(model_dir)}},
        data={"max_bytes": 60_000},
        schedule={"steps": 4, "micro_batch_size": 2},
        checkpoint={"every": 2, "keep": 0, "storage": storage, "local_dir": str(tmp_path / "l")},
        resources={"workers": 2},
        deepspeed={"zero_optimization": {"stage": stage}},
    )
    spec = JobSpec.of("export", recipe)
    run_id, run_dir = open_job_run(spec)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(spec.recipe_yaml)
    out = tmp_path / "out"
    out.mkdir()
    run_two_ranks(
        tmp_path / "two_ranks.py", _TWO_RANKS, recipe_file, run_dir, recipe.tracking.uri, run_id,
        out, env={"IDS": json.dumps(IDS)}, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    return recipe, {**json.loads((out / "summary.json").read_text()), "run_id": run_id}, out


def test_export_loads_in_a_fresh_process_and_generates(tmp_path: Path) -> None:
    """export_model's directory, loaded in a new interpreter as a user would, holds the
    exported (trained) weights and generates; its record covers every file."""
    from orchestrator.engine.checkpoint.io import sha256_file
    from orchestrator.engine.export import EXPORT_RECORD, export_model

    tiny_dir = build_tiny_hf(tmp_path / "pretrained")
    model = trained(tiny_dir)
    out = export_model(model, tmp_path / "export", str(tiny_dir), record={"step": 7})
    assert out == tmp_path / "export"
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    wanted = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"}
    assert wanted | {EXPORT_RECORD} <= names
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["step"] == 7 and set(record["files"]) == names - {EXPORT_RECORD}
    for rel, want in record["files"].items():
        assert sha256_file(out / rel) == (want["sha256"], want["bytes"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    logits, text = fresh_process_load(out, tmp_path)
    assert torch.equal(logits, logits_of(model))  # the trained weights, not the pretrained ones
    assert not torch.equal(logits, logits_of(load_hf(tiny_dir)))
    assert text.startswith("def add") and len(text) > len("def add")


def _cli(*args: str) -> int:
    from orchestrator.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    return int(exit_.value.code or 0)


@pytest.mark.parametrize("stage", [1, 2])
def test_two_rank_run_exports_the_trained_model(tmp_path: Path, stage: int) -> None:
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from safetensors.torch import load_file

    # ZeRO-1 mirrors to a storage URI (export/ too); ZeRO-2 keeps a local run directory
    remote = tmp_path / "remote"
    storage = f"file://{remote}" if stage == 1 else str(tmp_path / "runs")
    recipe, exported, out = _run(tmp_path, stage, storage)
    uri, run_id = recipe.tracking.uri, exported["run_id"]
    path = Path(exported["path"])
    assert path.name == "export" and (path / "tokenizer.json").is_file()

    # the final model, loaded in a fresh process, is the trained engine (fp32, two ranks)
    engine_logits = torch.load(out / "engine_logits.pt", weights_only=True)
    logits, text = fresh_process_load(path, tmp_path)
    torch.testing.assert_close(logits, engine_logits, rtol=0, atol=0)
    assert text.startswith("def add")
    if stage == 1:  # mirrored like checkpoints, its record last
        mirrored = remote / run_id / "export"
        assert exported["uri"].endswith(f"{run_id}/export")
        assert (mirrored / "regimen-export.json").read_bytes() == (
            path / "regimen-export.json"
        ).read_bytes()
        assert (mirrored / "model.safetensors").read_bytes() == (
            path / "model.safetensors"
        ).read_bytes()

    # `regimen export RUN_ID --step 2 OUT` equals checkpoint 2's weights
    if stage == 1:  # only the storage still holds step 2: export pulls it, verified
        shutil.rmtree(Path(exported["path"]).parent / "checkpoints" / "step-00000002")
    target = tmp_path / "step2"
    assert _cli("export", run_id, str(target), "--step", "2", "--tracking-uri", uri) == 0
    want = torch.load(out / "step2.pt", weights_only=True)
    got = load_file(target / "model.safetensors")
    assert set(got) <= set(want) and len(got) >= len(want) - 1  # lm_head may be tied
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name
    assert json.loads((target / "regimen-export.json").read_text())["step"] == 2
    final = load_file(path / "model.safetensors")
    assert not torch.equal(got["model.embed_tokens.weight"], final["model.embed_tokens.weight"])

    # MLflow: the run's logged model, at the final step, loads back and equals the export
    client = mlflow.MlflowClient(uri)
    outputs = client.get_run(run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(exported["model_id"], 4)]
    logged = client.get_logged_model(exported["model_id"])
    assert logged.source_run_id == run_id and logged.status == LoggedModelStatus.READY
    pipe = load_logged_model(uri, exported["model_id"])
    pipe.model.eval()
    with torch.no_grad():
        from_mlflow = pipe.model(input_ids=torch.tensor([IDS])).logits
    torch.testing.assert_close(from_mlflow, engine_logits, rtol=0, atol=0)


def test_export_errors_exit_2(tmp_path: Path, mlflow_uri: str, capsys: Any) -> None:
    from orchestrator.control.controller import open_job_run
    from orchestrator.recipe.jobspec import JobSpec

    recipe = tiny_recipe(tmp_path, tracking={"uri": mlflow_uri})
    run_id, _ = open_job_run(JobSpec.of("tiny", recipe))
    out = tmp_path / "out"
    assert _cli("export", "no-such-run", str(out), "--tracking-uri", mlflow_uri) == 2
    assert "no MLflow run 'no-such-run'" in capsys.readouterr().err
    assert _cli("export", run_id, str(out), "--step", "3", "--tracking-uri", mlflow_uri) == 2
    assert "no committed checkpoint at step 3" in capsys.readouterr().err
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _cli("export", run_id, str(out), "--tracking-uri", mlflow_uri) == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.usefixtures("gloo_world")
def test_mlflow_down_at_the_end_keeps_the_run_and_its_export(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One in-process rank: the export is written; MLflow refusing the model does not fail
    the finished run (the event says why); `checkpoint.export: false` writes nothing."""
    import orchestrator.tracking.model as tracking_model
    from orchestrator.control.controller import open_job_run
    from orchestrator.engine.trainer import Trainer, WorkerContext
    from orchestrator.errors import TrackingError
    from orchestrator.recipe.jobspec import JobSpec

    def refused(*args: Any, **kwargs: Any) -> str:
        raise TrackingError("MLflow could not log the model: connection refused")

    monkeypatch.setattr(tracking_model, "log_hf_model", refused)
    model_dir = build_tiny_hf(tmp_path / "pretrained")
    for export in (True, False):
        recipe = tiny_recipe(
            tmp_path,
            replace={"model": {"kind": "hf_pretrained", "path": str(model_dir)}},
            schedule={"steps": 2, "micro_batch_size": 2},
            checkpoint={"every": 0, "export": export},
            tracking={"uri": mlflow_uri},
        )
        run_id, run_dir = open_job_run(JobSpec.of("one-rank", recipe))
        summary = Trainer(recipe, WorkerContext(run_dir, 0, 1, mlflow_uri, run_id)).run()
        assert summary["finished"]
        if not export:
            assert summary["export"] is None and not (run_dir / "export").exists()
            continue
        assert summary["export"]["path"] == str(run_dir / "export")
        assert "connection refused" in summary["export"]["log_error"]
        assert (run_dir / "export" / "model.safetensors").is_file()
        assert [e["kind"] for e in summary["events"]].count("export") == 1
