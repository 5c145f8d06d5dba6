"""LISA on real Ray: 2 DeepSpeed workers (gloo, CPU), ZeRO-1 and ZeRO-2.

Checkpoints are written at every interval boundary; between two consecutive ones
exactly the interval's sampled layers (plus embeddings, head and final norm)
must have changed, both ranks must have held the same active set, and MLflow
must show the active layers and the optimizer-state bytes.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import tiny_recipe
from orchestrator.engine.models import build_model
from orchestrator.recipe.jobspec import JobSpec
from orchestrator.techniques.lisa import LisaConfig, sample_layers

pytestmark = pytest.mark.integration

LAYERS, K, STEPS = 4, 2, 6
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def _model_states(step_dir: Path) -> dict[str, torch.Tensor]:
    path = step_dir / "ds" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False, map_location="cpu")["module"]


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[set[int], set[str]]:
    names = {k for k in a if not torch.equal(a[k], b[k])}
    layers = {int(m.group(1)) for k in names if (m := _LAYER_RE.search(k))}
    return layers, {k for k in names if not _LAYER_RE.search(k)}


@pytest.mark.parametrize("zero", [1, 2])
def test_exactly_the_sampled_layers_change_on_two_workers(zero, tmp_path, ray_local):
    from orchestrator.control.controller import run_job

    recipe = tiny_recipe(
        tmp_path,
        model={"config": {"num_hidden_layers": LAYERS}},
        schedule={"steps": STEPS, "micro_batch_size": 2},
        checkpoint={"every": K, "keep": 0},
        resources={"workers": 2, "max_restarts": 0},
        techniques={"lisa": {"gamma": 1, "interval": K}},
        deepspeed={"zero_optimization": {"stage": zero}},
    )
    result = run_job(JobSpec.of("lisa", recipe))
    assert result.status == "FINISHED", result.error
    root = Path(result.checkpoint).parent
    cfg = LisaConfig(gamma=1, interval=K)
    expected = [sample_layers(cfg, LAYERS, recipe.seed, i) for i in range(STEPS // K)]
    assert len({tuple(x) for x in expected}) > 1

    initial = {
        k: v.detach() for k, v in build_model(recipe.model, recipe.seed).state_dict().items()
    }
    previous = initial
    for i in range(STEPS // K):
        step_dir = root / f"step-{(i + 1) * K:08d}"
        current = _model_states(step_dir)
        layers, outside = _changed(previous, current)
        assert layers == set(expected[i]), (i, layers, expected[i])
        assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= outside
        ranks = [
            torch.load(step_dir / "regimen" / f"rank{r:05d}.pt", weights_only=True) for r in (0, 1)
        ]
        actives = [rs["techniques"]["lisa"]["active"] for rs in ranks]
        assert actives == [expected[i], expected[i]]  # the same layers on both ranks
        previous = current

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    masks = {
        m.step: int(m.value) for m in client.get_metric_history(result.run_id, "lisa/active_mask")
    }
    assert masks[1] == sum(1 << j for j in expected[0])
    assert all(masks[s] == sum(1 << j for j in expected[(s - 1) // K]) for s in masks)
    state_bytes = [
        m.value for m in client.get_metric_history(result.run_id, "lisa/optimizer_state_bytes")
    ]
    assert len(state_bytes) == STEPS and max(state_bytes) <= min(state_bytes) * 1.01  # never grows
