"""The base optimizer and the skip gate that lets the loop skip an update cleanly.

DeepSpeed (every ZeRO stage) calls the client optimizer's ``step()`` and then
clears gradients itself. Gating that call skips the update *and* leaves the
moments untouched, while DeepSpeed's own bookkeeping runs as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from orchestrator.recipe.schema import OptimizerConfig


def build_optimizer(
    param_groups: list[dict[str, Any]], cfg: OptimizerConfig, *, fused: bool = False
) -> torch.optim.Optimizer:
    """The torch optimizer the recipe names, over the given param groups.

    ``fused``: Adam/AdamW's fused kernel (one launch for all tensors of a group), for
    parameters that train on CUDA; otherwise the per-tensor loop (``foreach=False``), which
    is what CPU runs have always used (their results stay bit-for-bit the same).
    """
    groups = [{k: v for k, v in g.items()} for g in param_groups]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    kernel: dict[str, bool] = {"fused": True} if fused else {"foreach": False}
    return cls(
        groups,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        **kernel,
    )


def optimizer_on_cuda(accelerator: str, ds_config: dict[str, Any]) -> bool:
    """Whether the optimizer's parameters will live on CUDA: DeepSpeed's accelerator is
    ``cuda`` and ZeRO does not offload the optimizer to the CPU. (At build time the module
    may still be on the CPU: ``deepspeed.initialize`` moves it, so its device says nothing.)"""
    if accelerator != "cuda":
        return False
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() in ("none", "")


class StepGate:
    """Wraps ``optimizer.step`` so the loop can suppress exactly one update."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.skip_next = False
        self.skipped = 0
        self._step = optimizer.step
        optimizer.step = self._gated_step  # type: ignore[method-assign]

    def _gated_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.skip_next:
            self.skip_next = False
            self.skipped += 1
            return None
        return self._step(*args, **kwargs)
