"""The base optimizer and the skip gate that lets the loop skip an update cleanly.

DeepSpeed calls the client optimizer's ``step()`` from inside ``engine.step()``: once
at ZeRO-0, once per param group at ZeRO-1/2 (it narrows ``param_groups`` to one group
per call), once per sub-group at ZeRO-3. The skip is decided per *engine* step: while
:meth:`StepGate.engine_step` runs a skipped step, every one of those calls is
suppressed, so no parameter, master copy or moment changes, and DeepSpeed's own
bookkeeping (``global_steps``, ``micro_steps``, the accumulation boundary, clearing
and releasing the reduced gradients, re-gathering the unchanged partitions) runs as
on any other step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
    """Wraps ``optimizer.step`` so the loop can skip a whole engine step.

    ``skipped`` counts skipped engine steps, ``suppressed_calls`` the optimizer calls
    they swallowed (one per group under ZeRO-1/2)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.skipping = False
        self.skipped = 0
        self.suppressed_calls = 0
        self._step = optimizer.step
        optimizer.step = self._gated_step  # type: ignore[method-assign]

    def _gated_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.skipping:
            self.suppressed_calls += 1
            return None
        return self._step(*args, **kwargs)

    @contextlib.contextmanager
    def suppressing(self) -> Iterator[None]:
        """Every ``optimizer.step()`` inside the block is a no-op."""
        self.skipping = True
        try:
            yield
        finally:
            self.skipping = False

    def engine_step(self, engine: Any, skip: bool) -> bool:
        """``engine.step()``, with every optimizer update in it suppressed when ``skip``;
        returns ``skip``. DeepSpeed's counters and gradient clearing run either way."""
        if not skip:
            engine.step()
            return False
        with self.suppressing():
            engine.step()
        self.skipped += 1
        _unlink_empty_optimizer_state(engine, self.optimizer)
        return True


def _unlink_empty_optimizer_state(engine: Any, client: torch.optim.Optimizer) -> None:
    """ZeRO-1/2 links each parameter's view of the optimizer state after its first
    ``step()`` call; a skipped first step would link an empty state for good (and
    ``safe_get_full_optimizer_state`` would find no moments), so unlink it again."""
    zero: Any = getattr(engine, "optimizer", None)
    if getattr(zero, "_hp_optimizer_states_linked", False) and not any(client.state.values()):
        zero._hp_optimizer_states_linked = False
