"""Re-running the step in progress on the same batch from the same weights (spike replay).

Called between the last backward and the optimizer update (the spike guard's
``on_before_optimizer_step``): the batch is a pure function of the cursor, the weights
have not moved, so a re-run tells a data-caused anomaly (it reproduces) from a transient
fault of one pass (it does not). The gradients DeepSpeed is about to apply are left alone:
the re-run takes its gradients with ``torch.autograd.grad`` on the module's parameters
(ZeRO-0/1/2 hold full parameters on every rank), averaged across ranks like the step's own.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from orchestrator.distributed import all_reduce_
from orchestrator.techniques.base import Replay

if TYPE_CHECKING:
    from orchestrator.engine.trainer import Trainer


def replay_step(trainer: Trainer, first_loss: float) -> Replay:
    """This rank's loss and squared gradient norm of the current step, computed again."""
    started = time.perf_counter()
    engine, recipe = trainer.built.engine, trainer.recipe
    module = engine.module
    params = [p for p in module.parameters() if p.requires_grad]
    accumulation = recipe.schedule.grad_accumulation
    sums: list[torch.Tensor | None] = [None] * len(params)
    loss_sum = 0.0
    for micro in range(accumulation):
        batch = trainer.batches.micro_batch_at(trainer.loop.cursor, micro)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = trainer.task.loss(module, batch)
        grads = torch.autograd.grad(loss / accumulation, params, allow_unused=True)
        for i, g in enumerate(grads):
            prev = sums[i]
            if g is not None:
                sums[i] = g.detach() if prev is None else prev + g.detach()
        loss_sum += float(loss.detach())
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double()
                      for g, p in zip(sums, params, strict=True)])  # fmt: skip
    if trainer.ctx.world_size > 1:  # the step's gradients are averaged across ranks too
        flat = all_reduce_(flat) / trainer.ctx.world_size
    grad_sq = float(flat.pow(2).sum())
    return Replay(
        first_loss=first_loss,
        loss=loss_sum / accumulation,
        grad_sq=grad_sq,
        seconds=time.perf_counter() - started,
    )
