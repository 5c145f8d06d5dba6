"""The classification path: digits data, builtin ViT/MLP, cross-entropy + accuracy, Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_recipe
from orchestrator.data import build_data
from orchestrator.engine.loop import Trainer, WorkerContext
from orchestrator.engine.tasks import CausalLM, Classification, build_task_model, eval_metrics
from orchestrator.errors import UsageError
from orchestrator.recipe.schema import DataConfig, ModelConfig


def _recipe(tmp_path: Path, **sections: Any) -> Any:
    """The tiny recipe with the builtin MLP on 8x8 digits."""
    mlp = {"model": {"kind": "builtin", "architecture": "mlp"},
           "data": {"kind": "digits", "eval_fraction": 0.2}}  # fmt: skip
    return tiny_recipe(tmp_path, replace=mlp, **sections)


def test_digits_split_is_fixed_normalised_and_labelled():
    a = build_data(DataConfig(kind="digits", eval_fraction=0.2))
    b = build_data(DataConfig(kind="digits", eval_fraction=0.2))
    assert len(a.train) + len(a.eval) == 1797 and len(a.eval) == 359
    assert a.fingerprint == b.fingerprint and torch.equal(a.train.images, b.train.images)
    sample = a.train[0]
    assert sample["pixel_values"].shape == (1, 8, 8) and sample["labels"].dtype == torch.long
    assert abs(float(a.train.images.mean())) < 1e-4 and abs(float(a.train.images.std()) - 1) < 1e-3
    assert set(a.eval.labels.tolist()) == set(range(10))


@pytest.mark.parametrize("arch", ["vit", "mlp"])
def test_builtin_models_give_logits(arch):
    model = build_task_model(ModelConfig(kind="builtin", architecture=arch), seed=0)
    assert model(pixel_values=torch.randn(5, 1, 8, 8)).shape == (5, 10)
    same = build_task_model(ModelConfig(kind="builtin", architecture=arch), seed=0)
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), same.parameters(), strict=True)
    )


def test_builtin_model_section_is_validated():
    assert ModelConfig(kind="builtin", architecture="vit").task == "classification"
    with pytest.raises(ValueError, match="architecture: vit"):
        ModelConfig(kind="builtin")  # llama is not builtin
    with pytest.raises(ValueError, match="set kind: builtin"):
        ModelConfig(kind="hf_config", architecture="mlp")
    with pytest.raises(ValueError, match="unknown config key"):
        ModelConfig(kind="builtin", architecture="mlp", config={"hidden_size": 4})
    with pytest.raises(ValueError, match="classifiers"):
        ModelConfig(kind="builtin", architecture="mlp", task="causal_lm")


def test_classification_loss_and_metrics():
    task = Classification()

    def model(pixel_values):
        return pixel_values.flatten(1)[:, :3]

    batch = {
        "pixel_values": torch.tensor([[5.0, 0, 0], [0, 0, 5.0]]),
        "labels": torch.tensor([0, 1]),
    }
    expected = F.cross_entropy(batch["pixel_values"], batch["labels"])
    assert torch.allclose(task.loss(model, batch), expected)
    sums = task.eval_batch(model, batch)
    assert (sums.correct, sums.count) == (1.0, 2.0)
    got = eval_metrics([sums.loss, 1.0, sums.correct, sums.count], task)
    assert got["eval_accuracy"] == 0.5 and got["eval_loss"] == pytest.approx(float(expected))
    assert "eval_accuracy" not in eval_metrics([2.0, 1.0, 0.0, 0.0], CausalLM())
    with pytest.raises(UsageError, match="labels"):
        task.loss(model, {"pixel_values": batch["pixel_values"]})


# The ViT at half its default width and depth: it learns the digits in a third of the CPU
# time the default one needs; the code trained is the same builtin ViT.
SMALL_VIT = {"dim": 32, "depth": 2}


@pytest.mark.parametrize(
    ("arch", "size", "steps", "floor"), [("mlp", {}, 60, 0.5), ("vit", SMALL_VIT, 100, 0.35)]
)
def test_classification_trains_on_digits_above_chance(
    arch, size, steps, floor, tmp_path, gloo_world
):
    recipe = _recipe(
        tmp_path,
        model={"architecture": arch, "config": {"dropout": 0.1, **size}},
        optimizer={"lr": 3e-3},
        schedule={"steps": steps, "micro_batch_size": 32, "eval_batches": 12},
        checkpoint={"every": 0},
        techniques={"dropout": {"mode": "early", "cutoff_fraction": 0.5}},
    )
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"))
    summary = trainer.run()
    assert summary["finished"] and summary["steps"] == steps
    assert summary["eval_accuracy"] > floor, summary  # chance is 0.1
    assert summary["eval_loss"] < 2.0  # chance is ln(10) = 2.30
    assert set(trainer.eval_results) == {"eval_loss", "eval_accuracy"}
