"""What a model is trained to do: the training loss and the eval metrics of each `model.task`.

* ``causal_lm``: the model computes its own loss (HF ``out.loss``, or a factory model that
  returns the loss tensor); eval reports ``eval_loss``.
* ``classification``: the model gets the batch without ``labels`` and returns logits (a
  tensor, or an object with ``.logits``); the loss is cross-entropy; eval reports
  ``eval_loss`` and ``eval_accuracy``. Works for the builtin ViT/MLP and for user factories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from orchestrator.errors import UsageError

if TYPE_CHECKING:
    from orchestrator.recipe.schema import ModelConfig


@dataclass
class EvalSums:
    """Per-batch sums that add up across batches and ranks."""

    loss: float
    correct: float = 0.0
    count: float = 0.0


class CausalLM:
    """The model's own language-modelling loss."""

    name = "causal_lm"
    metrics: tuple[str, ...] = ("eval_loss",)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Packed samples (position_ids restarting per document) are kept apart by HF's
        # block-diagonal mask only without a KV cache, which HF models build by default.
        extra = {"use_cache": False} if "position_ids" in batch else {}
        out = model(**batch, **extra)
        return out if isinstance(out, torch.Tensor) else out.loss

    def eval_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> EvalSums:
        return EvalSums(loss=float(self.loss(model, batch)))


class Classification:
    """Cross-entropy on logits; accuracy as the eval metric."""

    name = "classification"
    metrics: tuple[str, ...] = ("eval_loss", "eval_accuracy")

    def logits(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "labels" not in batch:
            raise UsageError(
                "model.task classification: samples need a 'labels' entry (class ids); "
                "use data.kind digits or a data factory returning {'pixel_values', 'labels'}"
            )
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if logits is None or logits.ndim != 2:
            raise UsageError(
                "model.task classification: the model must return logits of shape "
                "(batch, classes) (a tensor or an object with .logits)"
            )
        return logits

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["labels"])

    def eval_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> EvalSums:
        logits = self.logits(model, batch)
        labels = batch["labels"]
        return EvalSums(
            loss=float(F.cross_entropy(logits, labels)),
            correct=float((logits.argmax(dim=-1) == labels).sum()),
            count=float(labels.numel()),
        )


def task_for(cfg: ModelConfig) -> CausalLM | Classification:
    """The task object for a recipe's model section."""
    return Classification() if cfg.task == "classification" else CausalLM()


def build_task_model(
    cfg: ModelConfig, seed: int, attn_implementation: str | None = None
) -> torch.nn.Module:
    """The recipe's model: the builtin ViT/MLP for `kind: builtin`, else models.build_model
    (with the run's attention implementation)."""
    if cfg.kind == "builtin":
        from orchestrator.engine.vision import build_builtin

        return build_builtin(cfg.architecture, cfg.config, seed)
    from orchestrator.engine.models import build_model

    return build_model(cfg, seed, attn_implementation)


def eval_metrics(sums: list[float], task: CausalLM | Classification) -> dict[str, float]:
    """``[loss_sum, batches, correct, count]`` (summed over ranks) -> the task's eval metrics."""
    loss_sum, batches, correct, count = sums
    out = {"eval_loss": loss_sum / max(1.0, batches)}
    if "eval_accuracy" in task.metrics and count > 0:
        out["eval_accuracy"] = correct / count
    return out
