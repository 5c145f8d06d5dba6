"""tokens/s and MFU: the FLOPs estimate, the peak table, the per-step metric, a real run's
MLflow metrics; and the optimizer's fused kernel on CUDA only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from conftest import tiny_recipe
from orchestrator.engine import throughput as T
from orchestrator.engine.optim import build_optimizer, optimizer_on_cuda
from orchestrator.recipe.schema import OptimizerConfig


def test_flops_per_token_is_6n_plus_the_attention_term() -> None:
    # a 1 B model, 24 layers of width 2048, on 2048-token sequences
    n, layers, width, seq = 1_000_000_000, 24, 2048, 2048
    assert T.flops_per_token(n, layers, width, seq) == 6e9 + 12 * 24 * 2048 * 2048
    assert T.flops_per_token(10, 0, 0, 512) == 60.0  # no transformer: 6 N only


def _llama(tied: bool) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [False, True])
def test_model_shape_counts_matmul_parameters(tied: bool) -> None:
    model = _llama(tied)
    total = sum(p.numel() for p in model.parameters())  # a tied weight is listed once
    shape = T.ModelShape.of(model)
    embedding = 100 * 16
    assert shape.matmul_params == (total if tied else total - embedding)
    assert (shape.layers, shape.width) == (3, 16)
    mlp = T.ModelShape.of(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    assert mlp == T.ModelShape(matmul_params=15, layers=0, width=0)


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H200", "fp32", 67e12),
        ("NVIDIA A100-SXM4-80GB", "fp32", 19.5e12),
        ("NVIDIA A100 80GB PCIe", "bf16", 312e12),
        ("NVIDIA A10G", "bf16", 125e12),
        ("NVIDIA L4", "fp16", 121e12),
        ("NVIDIA L40S", "bf16", 362e12),
        ("Tesla V100-SXM2-16GB", "fp16", 125e12),
        ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 on Volta: no MFU
        ("Some Future GPU", "bf16", None),
        (None, "fp32", None),
    ],
)
def test_peak_table(name: str | None, precision: str, peak: float | None) -> None:
    assert T.peak_flops(name, precision) == peak


def test_metrics_per_step_and_reset() -> None:
    shape = T.ModelShape(matmul_params=1000, layers=2, width=8)
    meter = T.Throughput(shape, peak=1e6, devices=2)
    ids = torch.zeros(4, 16, dtype=torch.long)
    meter.count({"input_ids": ids, "labels": ids})
    meter.count({"input_ids": ids, "labels": ids})  # two micro-batches of 64 tokens
    out = meter.metrics(elapsed_s=0.5, world_size=2)
    assert out["tokens_per_s"] == 2 * 128 / 0.5
    flops = 2 * 128 * T.flops_per_token(1000, 2, 8, 16)
    assert out["mfu"] == pytest.approx(flops / 0.5 / (1e6 * 2))
    assert meter.metrics(elapsed_s=0.5, world_size=2) == {}  # the count was reset
    no_peak = T.Throughput(shape, peak=None, devices=1)
    no_peak.count({"input_ids": ids})
    assert set(no_peak.metrics(1.0, 1)) == {"tokens_per_s"}
    images = T.Throughput(shape, peak=1e6, devices=1)
    images.count({"pixel_values": torch.zeros(2, 3, 8, 8), "labels": torch.zeros(2)})
    assert images.metrics(1.0, 1) == {}  # no tokens to count


def test_no_mfu_on_the_cpu() -> None:
    meter = T.Throughput.for_run(_llama(False), torch.device("cpu"), "fp32", devices=1)
    assert meter.peak is None


def test_fused_adamw_only_on_cuda() -> None:
    assert optimizer_on_cuda("cuda", {"zero_optimization": {"stage": 2}})
    assert not optimizer_on_cuda("cpu", {})
    offload = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    assert not optimizer_on_cuda("cuda", offload)
    assert optimizer_on_cuda("cuda", {"zero_optimization": {"offload_optimizer": {}}})
    p = torch.nn.Parameter(torch.zeros(3))
    cfg = OptimizerConfig(name="adamw", lr=1e-3)
    cpu = build_optimizer([{"params": [p]}], cfg)
    assert cpu.defaults["foreach"] is False and not cpu.defaults["fused"]
    fused = build_optimizer([{"params": [p]}], cfg, fused=True)
    assert fused.defaults["fused"] is True


def test_a_real_run_logs_tokens_per_s_and_mfu_to_mlflow(
    tmp_path: Path, gloo_world: None, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from orchestrator.engine.loop import Trainer, WorkerContext
    from orchestrator.tracking.runs import open_run

    real = T.Throughput.for_run

    def with_a_known_peak(*args: Any, **kwargs: Any) -> T.Throughput:
        meter = real(*args, **kwargs)
        assert meter.peak is None  # the CPU: no MFU of its own
        meter.peak = 1e9  # as a GPU in the table would give
        return meter

    monkeypatch.setattr(T.Throughput, "for_run", with_a_known_peak)
    run_id = open_run(mlflow_uri, "throughput", "job")
    recipe = tiny_recipe(tmp_path, schedule={"steps": 4, "log_every": 1})
    ctx = WorkerContext(run_dir=tmp_path / "run", tracking_uri=mlflow_uri, run_id=run_id)
    trainer = Trainer(recipe, ctx)
    trainer.run()
    client = mlflow.MlflowClient(mlflow_uri)
    tokens = client.get_metric_history(run_id, "tokens_per_s")
    mfu = client.get_metric_history(run_id, "mfu")
    assert [m.step for m in tokens] == [1, 2, 3, 4] and all(m.value > 0 for m in tokens)
    assert [m.step for m in mfu] == [1, 2, 3, 4] and all(m.value > 0 for m in mfu)
    per_step = recipe.global_batch_size * recipe.data.seq_len  # every sample is seq_len long
    shape = T.ModelShape.of(trainer.model)
    want = T.flops_per_token(shape.matmul_params, shape.layers, shape.width, recipe.data.seq_len)
    times = client.get_metric_history(run_id, "step_time_s")
    for t, m, s in zip(tokens, mfu, times, strict=True):  # all from the same step time
        assert t.value * s.value == pytest.approx(per_step, rel=1e-6)
        assert m.value == pytest.approx(t.value * want / 1e9, rel=1e-6)
    assert shape.layers == 2
