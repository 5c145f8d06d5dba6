"""LR warmup and decay: linear warmup, then linear / cosine / constant / WSD decay.

Regimen computes the LR itself each optimizer step and writes it into the
optimizer's param groups; DeepSpeed's own WarmupLR (a *log* ramp by default) is
not used. The LR is a pure function of the step (:func:`scheduled_lr`, with the
config, in :mod:`orchestrator.recipe.techniques.warmup`), so resume needs no state.
"""

from __future__ import annotations

from orchestrator.recipe import catalog
from orchestrator.recipe.techniques.warmup import WarmupConfig, scheduled_lr
from orchestrator.techniques.base import Technique, TrainState
from orchestrator.techniques.registry import TechniqueSpec


class Warmup(Technique):
    """Sets the scheduled LR (``state.set_lr``) at the start of every optimizer step."""

    name = "warmup"

    def __init__(self, cfg: WarmupConfig, peak_lr: float):
        self.cfg = cfg
        self.peak_lr = peak_lr

    def on_step_begin(self, state: TrainState) -> None:
        state.set_lr(scheduled_lr(self.cfg, self.peak_lr, state.step, state.total_steps))
        if state.step == self.cfg.resolved_warmup(state.total_steps) > 0:
            # the end of warmup: the fast early fall of the loss and gradient norm is over;
            # detectors restart from the statistics of training at the peak LR
            state.mark_regime_change()


SPEC = TechniqueSpec(catalog.WARMUP, build=lambda cfg, recipe: Warmup(cfg, recipe.optimizer.lr))
