"""Leading indicators of loss spikes, measured every ``stability.indicators_every`` steps.

Three signals that, in the literature, move *before* the loss does:

* **AdamW update ratio** (Wortsman et al. 2023, "Stable and low-precision training for
  large-scale vision-language models", StableAdamW): per layer,
  ``RMS = sqrt(mean(g_t^2 / max(v_hat_t, eps^2)))`` with ``v_t = beta2 v_{t-1} + (1 - beta2)
  g_t^2`` bias-corrected. It is ~1 while the second-moment estimate is up to date and jumps
  when a gradient is far larger than ``v`` predicts, which the paper finds precedes loss spikes
  by a few steps. The headline metric is the max over layers, ``indicator/update_rms_max``.
  It is measured inside the base optimizer's ``step()`` (a wrapper installed through
  ``Setup.wrap_optimizer``), so it sees exactly the (unscaled, clipped) gradient and state
  AdamW uses: torch's per-parameter state under ZeRO-0, DeepSpeed's flat fp32 partitions
  under ZeRO-1/2 (each module parameter's slice found through its ``_hp_mapping``; per-layer
  sums are all-reduced, so every rank sees the same numbers).
* **Token embedding variability** (Chung et al. 2024, "Stable Language Model Pre-training by
  Reducing Embedding Variability", arXiv:2409.07787): for each token row ``e_i`` of the input
  embedding, ``TEV_i = std(e_i)`` over its ``d`` entries; logged as the mean and the std over
  the vocabulary (``indicator/tev_mean``, ``indicator/tev_std``). Needs full embedding weights
  on the rank (ZeRO-0/1/2).
* **Attention entropy** (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing
  Attention Entropy Collapse"): per layer, the mean Shannon entropy (nats) of the attention
  probabilities of the first micro-batch of the step, from a forward hook on each attention
  module; the headline is the min over layers, ``indicator/attn_entropy_min`` (collapse = low).
  It needs the *eager* attention implementation, which returns the probabilities (Regimen
  builds HF models with it whenever ``stability.indicators_every`` is on, and refuses an
  explicit other ``model.attn_implementation`` then, see
  :func:`orchestrator.recipe.hf_models.attention_implementation`); with sdpa/flash attention
  the probabilities are never materialised and the signal is reported unavailable (event
  ``indicator_unavailable``).
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import torch

from orchestrator.distributed import all_reduce_

_LAYER_RE = re.compile(r"^(.*?\.\d+)\.")


def layer_of(param_name: str) -> str:
    """The layer a parameter belongs to: ``model.layers.3.mlp.up.weight`` -> ``model.layers.3``;
    a name without a block index keeps its module path (``lm_head.weight`` -> ``lm_head``)."""
    m = _LAYER_RE.match(param_name)
    if m:
        return m.group(1)
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


class IndicatorProbe:
    """Measures the three indicators on the steps it is armed for; all values are per step.

    Usage (the spike guard does this): ``attach(model)`` once, ``wrap(optimizer)`` through
    ``Setup.wrap_optimizer``, ``arm()`` at the start of a measured step, ``collect(model)``
    after the optimizer step (collective: every rank must call it on the same steps).
    """

    def __init__(self, update_rms: bool = True, tev: bool = True, attn_entropy: bool = True):
        self.want_update = update_rms
        self.want_tev = tev
        self.want_entropy = attn_entropy
        self.armed = False
        self.layers: list[str] = []
        self._index: dict[str, int] = {}
        self._update_sums: torch.Tensor | None = None  # [layers, 2]: sum of ratios, count
        self._entropy: dict[str, float] = {}
        self._hooks: list[Any] = []
        self.attn_names: list[str] = []
        self._model: torch.nn.Module | None = None
        self.entropy_unavailable = False
        self.cost_s = 0.0

    # -- setup -------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> None:
        """Learn the layer names and put forward hooks on attention modules (idempotent)."""
        if self._model is model:
            return
        self.detach()
        self._model = model
        self.layers = sorted({layer_of(n) for n, _ in model.named_parameters()})
        self._index = {name: i for i, name in enumerate(self.layers)}
        if self.want_entropy:
            for name, module in model.named_modules():
                if type(module).__name__.endswith("Attention") and name:
                    self.attn_names.append(name)
                    self._hooks.append(module.register_forward_hook(self._entropy_hook(name)))

    def detach(self) -> None:
        """Remove the forward hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._model = None

    def wrap(self, optimizer: Any) -> Any:
        """Install the update-ratio measurement around ``optimizer.step`` (returns it)."""
        inner = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if self.armed and self.want_update:
                started = time.perf_counter()
                try:
                    self._measure_update(optimizer)
                finally:
                    self.cost_s += time.perf_counter() - started
            return inner(*args, **kwargs)

        optimizer.step = step
        return optimizer

    def arm(self) -> None:
        """Measure during the coming step."""
        self.armed = True
        self._update_sums = None
        self._entropy = {}

    # -- measurements ------------------------------------------------------------------------
    def _entropy_hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not self.armed or name in self._entropy or not module.training:
                return
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(probs, torch.Tensor) or probs.dim() < 2:
                self.entropy_unavailable = True
                return
            started = time.perf_counter()
            with torch.no_grad():
                p = probs.detach().float()
                ent = -torch.special.xlogy(p, p).sum(-1)
                self._entropy[name] = float(ent.mean())
            self.cost_s += time.perf_counter() - started

        return hook

    def _param_slices(self, optimizer: Any) -> list[tuple[int, torch.Tensor, int, int]]:
        """(layer, optimizer param, start, numel) for every module parameter's slice here."""
        if self._model is None:
            raise RuntimeError("indicator probe used before attach()")
        groups = optimizer.param_groups
        by_id = {id(p): p for g in groups for p in g["params"]}
        out = []
        for name, p in self._model.named_parameters():
            layer = self._index[layer_of(name)]
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:  # DeepSpeed ZeRO-1/2: a slice of a flat fp32 partition
                flat = groups[mapping.param_group_index]["params"][0]
                addr = mapping.hp_fragment_address
                out.append((layer, flat, int(addr.start), int(addr.numel)))
            elif id(p) in by_id:  # the torch optimizer holds the module parameter itself
                out.append((layer, p, 0, p.numel()))
        return out

    @torch.no_grad()
    def _measure_update(self, optimizer: Any) -> None:
        sums = torch.zeros(len(self.layers), 2, dtype=torch.float64)
        ratios: dict[int, torch.Tensor] = {}
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for layer, param, start, numel in self._param_slices(optimizer):
            if param.grad is None or numel == 0:
                continue
            if id(param) not in ratios:
                group = group_of[id(param)]
                beta2 = float(group.get("betas", (0.9, 0.999))[1])
                eps = float(group.get("eps", 1e-8))
                state = optimizer.state.get(param, {})
                g = param.grad.detach().reshape(-1).float()
                prev = state.get("exp_avg_sq")
                step = float(state["step"]) + 1 if "step" in state else 1.0
                # v_hat = (beta2 v_prev + (1 - beta2) g^2) / (1 - beta2^t); few temporaries
                v = torch.zeros_like(g) if prev is None else prev.reshape(-1).float() * beta2
                v.addcmul_(g, g, value=1 - beta2).div_(1 - beta2**step).clamp_(min=eps * eps)
                ratios[id(param)] = (g * g).div_(v)
            r = ratios[id(param)].narrow(0, start, numel)
            sums[layer, 0] += float(r.sum(dtype=torch.float64))  # host scalar (state may be on GPU)
            sums[layer, 1] += numel
        self._update_sums = sums

    def tev(self, model: torch.nn.Module) -> tuple[float, float] | None:
        """(mean, std) over tokens of each embedding row's std (Chung et al. 2024), or None."""
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if get is not None else None
        weight = getattr(emb, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
            return None
        with torch.no_grad():
            per_token = weight.detach().float().std(dim=1, unbiased=False)
            return float(per_token.mean()), float(per_token.std(unbiased=False))

    def collect(self, model: torch.nn.Module) -> dict[str, float]:
        """The metrics of the step just run (collective across ranks); disarms the probe."""
        started = time.perf_counter()
        out: dict[str, float] = {}
        # Fixed-size all-reduce on every rank, measured or not, so ranks never diverge.
        n = len(self.layers)
        if self.want_update:
            sums = self._update_sums if self._update_sums is not None else torch.zeros(n, 2)
            sums = all_reduce_(sums.double())
            rms = {
                self.layers[i]: math.sqrt(float(sums[i, 0] / sums[i, 1]))
                for i in range(n)
                if sums[i, 1] > 0
            }
            if rms:
                out["indicator/update_rms_max"] = max(rms.values())
                out |= {f"indicator/update_rms/{k}": v for k, v in rms.items()}
        if self.want_tev:
            got = self.tev(model)
            if got is not None:
                out["indicator/tev_mean"], out["indicator/tev_std"] = got
        if self.want_entropy and self.attn_names:  # mean over ranks of each rank's micro-batch
            rows = [[self._entropy.get(a, 0.0), float(a in self._entropy)] for a in self.attn_names]
            ent = all_reduce_(torch.tensor(rows, dtype=torch.float64))
            ents = {
                a: float(ent[i, 0] / ent[i, 1]) for i, a in enumerate(self.attn_names) if ent[i, 1]
            }
            if ents:
                out["indicator/attn_entropy_min"] = min(ents.values())
                out |= {f"indicator/attn_entropy/{k}": v for k, v in ents.items()}
        self.armed = False
        self.cost_s += time.perf_counter() - started
        out["indicator/cost_s"] = self.cost_s
        self.cost_s = 0.0
        return out
