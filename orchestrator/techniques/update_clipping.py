"""Update clipping (`techniques.update_clipping`), after StableAdamW (Wortsman et al. 2023,
"Stable and low-precision training for large-scale vision-language models").

Loss spikes follow, by 1-8 steps, an optimizer step in which AdamW's second moment ``v``
underestimates the squared gradient. For every parameter tensor, right before the
optimizer steps::

    v_hat = (beta2 * v_prev + (1 - beta2) * g^2) / (1 - beta2^t)      (what AdamW will use)
    RMS   = sqrt(mean(g^2 / max(v_hat, eps^2)))

and when ``RMS > max_rms`` the tensor's step size is divided by ``RMS / max_rms``
(``max_rms = 1`` is the paper's ``lr / max(1, RMS)``). ``g`` is the gradient the optimizer
sees (after DeepSpeed's unscaling and global clip).

How it is applied: the wrapper around the optimizer's ``step()`` computes the factors,
copies the tensors it will clip, lets the optimizer (AdamW, or SGG's wrapper around it)
step, then moves each clipped tensor back to ``old + (new - old) / factor``. AdamW's update
(decoupled weight decay included) is linear in the LR, so this is the step with
``lr / factor`` for that tensor and leaves the moments exactly as AdamW set them; it
composes with whatever sets the LR per group or per element (Regimen's
``lr_multiplier``, SGG's factors, LISA's active set: only the tensors the optimizer holds
are considered, frozen layers have no state).

Under ZeRO-1/2 the optimizer holds one flat fp32 partition per param group, stepped one
group at a time. Each module tensor's slice of it is found through DeepSpeed's
``_hp_mapping`` (its ``hp_fragment`` is a view into the partition); the per-tensor sums
are all-reduced when the partitions span several ranks, so a tensor split across ranks
gets one RMS and every rank clips it alike. ZeRO-3 is refused when the recipe is validated
(:mod:`orchestrator.recipe.techniques.update_clipping`).

Recorded per step: ``update_clipping/clipped_fraction`` (tensors clipped / tensors
stepped) and ``update_clipping/rms_max``. The technique has no state: the factors are a
function of the gradient and the optimizer state, so resume is exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from orchestrator.distributed import all_reduce_
from orchestrator.recipe import catalog
from orchestrator.recipe.techniques.update_clipping import UpdateClippingConfig
from orchestrator.techniques.base import Capability, Decision, Setup, Technique, TrainState
from orchestrator.techniques.registry import TechniqueSpec

# (tensor index, optimizer param, start, numel): a module tensor's slice of what the
# optimizer holds (the tensor itself under ZeRO-0, a slice of a flat partition under ZeRO-1/2)
Slice = tuple[int, torch.Tensor, int, int]
_SLACK = 1e-5


def _storage(t: torch.Tensor) -> int:
    return int(t.untyped_storage().data_ptr())


class UpdateClipper:
    """Wraps an optimizer's ``step()`` with per-tensor update clipping (see the module doc).

    ``partitioned``: the optimizer state is split across data-parallel ranks (ZeRO-1/2 with
    more than one rank); the per-tensor sums are then all-reduced, collectively, on every
    ``step()`` call (every rank steps the same groups in the same order).
    """

    def __init__(self, max_rms: float = 1.0, partitioned: bool = False):
        self.max_rms = max_rms
        self.partitioned = partitioned
        self.tensors: list[torch.Tensor] = []  # the module tensors the optimizer was built on
        self.clipped = 0
        self.stepped = 0
        self.rms_max = 0.0
        self.last_factors: dict[int, float] = {}  # tensor index -> factor of the last step()

    def wrap(self, optimizer: Any) -> Any:
        """Install the clipping around ``optimizer.step`` (returns the same optimizer).

        Call before ``deepspeed.initialize``: the optimizer's groups still hold the module
        tensors, which are what RMS is formed over."""
        self.tensors = [p for g in optimizer.param_groups for p in g["params"]]
        inner = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            with torch.no_grad():
                restore = self._prepare(optimizer)
            out = inner(*args, **kwargs)
            with torch.no_grad():
                for view, old, factor in restore:
                    view.sub_(old).div_(factor).add_(old)
            return out

        optimizer.step = step
        return optimizer

    def take_metrics(self) -> dict[str, float]:
        """This optimizer step's figures (empty when no update ran); resets them."""
        out: dict[str, float] = {}
        if self.stepped:
            out = {
                "update_clipping/clipped_fraction": self.clipped / self.stepped,
                "update_clipping/rms_max": self.rms_max,
            }
        self.clipped = self.stepped = 0
        self.rms_max = 0.0
        return out

    # -- the step -----------------------------------------------------------------------------
    def _slices(self, optimizer: Any) -> list[tuple[dict[str, Any], Slice]]:
        """Every module tensor's slice in the groups being stepped now, with its group."""
        index = {id(p): i for i, p in enumerate(self.tensors)}
        fragments: dict[int, list[tuple[int, int, int]]] = {}  # storage -> (tensor, start, n)
        for i, p in enumerate(self.tensors):
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                addr = mapping.hp_fragment_address
                fragments.setdefault(_storage(mapping.hp_fragment), []).append(
                    (i, int(addr.start), int(addr.numel))
                )
        out: list[tuple[dict[str, Any], Slice]] = []
        for group in optimizer.param_groups:
            for q in group["params"]:
                if q.grad is None:
                    continue
                if id(q) in index:  # the torch optimizer holds the module tensor itself
                    out.append((group, (index[id(q)], q, 0, q.numel())))
                else:  # a flat partition: the module tensors mapped into it
                    for i, start, numel in fragments.get(_storage(q), []):
                        out.append((group, (i, q, start, numel)))
        return out

    def _prepare(self, optimizer: Any) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """The factors of this ``step()``; copies of the slices to clip (to restore after)."""
        slices = self._slices(optimizer)
        sums = torch.zeros(len(self.tensors), 2, dtype=torch.float64)
        ratios: dict[int, torch.Tensor] = {}
        for group, (i, q, start, numel) in slices:
            if numel == 0:
                continue
            if id(q) not in ratios:
                ratios[id(q)] = self._ratio(optimizer, group, q)
            r = ratios[id(q)].narrow(0, start, numel)
            sums[i, 0] += float(r.sum(dtype=torch.float64))
            sums[i, 1] += numel
        if self.partitioned:
            sums = all_reduce_(sums)
        factors: dict[int, float] = {}
        for i in range(len(self.tensors)):
            if sums[i, 1] > 0:
                rms = math.sqrt(float(sums[i, 0] / sums[i, 1]))
                self.stepped += 1
                if math.isfinite(rms):
                    self.rms_max = max(self.rms_max, rms)
                # NaN never clips (the spike guard handles it); the slack absorbs rounding
                # (on AdamW's first step RMS is exactly 1 on paper, 1 + 1e-7 in fp32)
                if rms > self.max_rms * (1 + _SLACK):
                    factors[i] = rms / self.max_rms
        self.clipped += len(factors)
        self.last_factors = factors
        restore = []
        for _, (i, q, start, numel) in slices:
            if i in factors and numel > 0:
                view = q.data.view(-1).narrow(0, start, numel)
                restore.append((view, view.clone(), factors[i]))
        return restore

    @staticmethod
    def _ratio(optimizer: Any, group: Mapping[str, Any], q: torch.Tensor) -> torch.Tensor:
        """``g^2 / max(v_hat, eps^2)`` over ``q``, flattened, as the coming AdamW step sees it."""
        beta2 = float(group["betas"][1])
        eps = float(group["eps"])
        state = optimizer.state.get(q, {})
        g = torch.zeros(q.numel()) if q.grad is None else q.grad.detach().reshape(-1).float()
        prev = state.get("exp_avg_sq")
        t = float(state["step"]) + 1 if "step" in state else 1.0
        v = torch.zeros_like(g) if prev is None else prev.reshape(-1).float() * beta2
        v.addcmul_(g, g, value=1 - beta2).div_(1 - beta2**t).clamp_(min=eps * eps)
        return (g * g).div_(v)


class UpdateClipping(Technique):
    """Wraps the optimizer in an :class:`UpdateClipper`; records the clipped fraction."""

    name = "update_clipping"
    capabilities = frozenset({Capability.CONFIGURES})

    def __init__(self, cfg: UpdateClippingConfig, zero_stage: int):
        self.cfg = cfg
        self.zero_stage = zero_stage
        self.clipper: UpdateClipper | None = None

    def configure(self, setup: Setup) -> None:
        partitioned = self.zero_stage >= 1 and setup.world_size > 1

        def wrap(optimizer: Any) -> Any:
            self.clipper = UpdateClipper(self.cfg.max_rms, partitioned=partitioned)
            return self.clipper.wrap(optimizer)

        setup.wrap_optimizer.append(wrap)

    def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> Decision:
        if self.clipper is not None:
            for name, value in self.clipper.take_metrics().items():
                state.record(name, value)
        return Decision()


SPEC = TechniqueSpec(
    catalog.UPDATE_CLIPPING,
    build=lambda cfg, recipe: UpdateClipping(cfg, recipe.zero_stage),
)
