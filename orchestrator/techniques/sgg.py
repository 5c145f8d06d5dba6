"""SGG: Scaling with Gradient Grouping (Li et al., ACL 2025, arXiv 2506.01049).

SGG wraps an adaptive optimizer. In every *layer* it clusters the magnitudes of
the first moment (momentum) into ``K`` groups with online mini-batch k-means,
and multiplies the learning rate of every element by its cluster's scale factor.

Regimen's layer is one parameter tensor of two or more dimensions (a weight
matrix or an embedding); ``configure`` gives each its own param group, so under
DeepSpeed ZeRO-1/2 the optimizer's flat fp32 partition of a group is one layer
(a contiguous slice of it when the data-parallel world is larger than one: then
every rank gathers the layer's momentum at a recluster, clusters the whole layer
exactly as one rank would, and keeps the labels of its own slice).
Parameters of fewer dimensions (norm gains, biases) keep the plain optimizer.

Every ``T`` optimizer steps (``t % T == 0``, ``t`` counted per layer), for each
layer ``l`` with momentum ``m`` (its ``N`` elements, flattened):

1. k-means on ``x = |m|`` (1-D), centroids ``c`` kept sorted ascending, counts
   ``n`` (both persist across reclusters). ``kmeans_iters`` times: assign each
   element to its nearest centroid (``bucketize`` on the midpoints, ties to the
   lower cluster); with ``b_k`` elements and sum ``s_k`` in cluster ``k``:
   ``n_k <- gamma * n_k + b_k``; ``c_k <- c_k + (s_k - b_k c_k) / n_k`` (when
   ``b_k > 0``). ``gamma = 1`` is sklearn's ``MiniBatchKMeans.partial_fit`` on the
   whole layer. Then labels are re-assigned with the final centroids (uint8).
   First recluster: ``c`` = quantiles ``(k + 0.5) / K`` of ``x`` (on at most
   65,536 evenly strided elements), ``n = 0``.
2. Median of Deviation to Average, per cluster:
   ``D[l, k] = median_{i : label_i = k} |m_i - mean(m)|`` (torch's *lower* median;
   NaN for an empty cluster).
3. Global reference ``D* = median over all layers and clusters of D[l, k]``
   (lower median over the non-NaN values), once per optimizer step after every
   layer has stepped, over the ``D`` of every data-parallel rank (all-gathered).
   Every rank holds a slice of every layer and computes each layer's ``D`` on the
   whole (gathered) layer, so the ranks contribute identical copies, and ``D*`` is
   the same on every rank and the same as on one rank.
4. ``S[l, k] <- beta3 * S[l, k] + (1 - beta3) * clamp(D* / (D[l, k] + eps), lo, hi)``,
   ``S`` starting at 1; an empty cluster keeps its ``S``.

Between reclusters, AdamW's adaptive step of element ``i`` of layer ``l`` uses
``lr * S[l, label_i]``: ``p -= lr * S / bc1 * m / (sqrt(v / bc2) + eps)``; the
decoupled weight decay ``p *= 1 - lr * wd`` keeps the scheduled LR. The new
factors apply from the optimizer step after the recluster (ZeRO steps one group
at a time, so the global median is known only once every layer has reclustered:
the technique finalizes in ``on_step_end``, after DeepSpeed's whole step).
For optimizers other than Adam/AdamW the whole update (decay included) of each
element is scaled: ``p <- p_old + S * (p_new - p_old)``.

Defaults follow the paper (K = 3, T = 500, beta3 = 0.99, factors clamped to
[0.1, 10], eps = 1e-8). All state is in the optimizer's ``state_dict``: per layer
``sgg_labels`` (uint8), ``sgg_centroids``, ``sgg_counts``, ``sgg_mda``,
``sgg_scale`` (K floats each) next to AdamW's moments, and per param group the
counters ``sgg_step``, ``sgg_reclusters`` and the flag ``sgg_pending``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.distributed import all_gather_tensor, world
from orchestrator.recipe import catalog
from orchestrator.recipe.techniques.sgg import SGGConfig
from orchestrator.techniques.base import (
    Capability,
    Decision,
    Setup,
    Technique,
    TrainState,
)
from orchestrator.techniques.registry import TechniqueSpec

if TYPE_CHECKING:
    pass

_QUANTILE_SAMPLE = 65_536


def lower_median(x: torch.Tensor) -> torch.Tensor:
    """torch's median convention (the lower of the two middle values), ignoring NaN."""
    return torch.nanmedian(x.flatten())


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest ascending ``centroids`` for each element of ``x`` (ties go to the lower one)."""
    mids = (centroids[1:] + centroids[:-1]) * 0.5
    return torch.bucketize(x, mids)


def kmeans_update(
    x: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor, iters: int, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mini-batch k-means on 1-D ``x``; returns sorted centroids, counts, int64 labels."""
    k = centroids.numel()
    for _ in range(iters):
        order = torch.argsort(centroids)
        centroids, counts = centroids[order], counts[order]
        labels = _assign(x, centroids)
        b, s = _cluster_sums(x, labels, k)
        counts = counts * gamma + b
        step = torch.where(
            b > 0, (s - b * centroids) / counts.clamp_min(1e-30), torch.zeros_like(s)
        )
        centroids = centroids + step
    order = torch.argsort(centroids)
    centroids, counts = centroids[order], counts[order]
    return centroids, counts, _assign(x, centroids)


def initial_centroids(x: torch.Tensor, k: int) -> torch.Tensor:
    """Quantiles (j + 0.5) / K of ``x`` on an evenly strided sample of at most 65,536 elements."""
    stride = max(1, x.numel() // _QUANTILE_SAMPLE)
    sample = x[::stride][:_QUANTILE_SAMPLE]
    q = (torch.arange(k, dtype=x.dtype, device=x.device) + 0.5) / k
    return torch.quantile(sample, q)


def _cluster_sums(
    x: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster element counts and sums of ``x``.

    On CUDA, one masked reduction per cluster rather than ``bincount``/``index_add_``:
    with a handful of bins the atomics contend on every element (3.5x slower on an
    H200) and float atomics make the sums order-dependent, which would break bit-for-bit
    resume. On the CPU ``index_add_`` is deterministic and the faster of the two."""
    if x.is_cuda:
        counts, sums = [], []
        for c in range(k):
            mask = labels == c
            counts.append(mask.sum())
            sums.append(torch.where(mask, x, 0.0).sum())
        return torch.stack(counts).to(x.dtype), torch.stack(sums)
    counts_t = torch.bincount(labels, minlength=k).to(x.dtype)
    return counts_t, torch.zeros(k, dtype=x.dtype).index_add_(0, labels, x)


def cluster_mda(m: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``D[k] = lower-median |m_i - mean(m)|`` over the elements of cluster k (NaN when empty).

    On CUDA two sorts serve all clusters (by deviation, then stably by label; cluster k's
    lower median then sits at a known offset); on the CPU a selection per cluster
    (``kthvalue``) is faster. Both give exactly torch's lower median."""
    dev = (m - m.mean()).abs()
    if not dev.is_cuda:
        out = []
        for c in range(k):
            members = dev[labels == c]
            if members.numel() == 0:
                out.append(torch.tensor(float("nan"), dtype=dev.dtype))
            else:
                out.append(members.kthvalue((members.numel() + 1) // 2).values)
        return torch.stack(out)
    by_dev = torch.argsort(dev)
    by_label = torch.argsort(labels[by_dev], stable=True)
    grouped = dev[by_dev][by_label]
    counts = torch.bincount(labels.long(), minlength=k)
    starts = torch.cumsum(counts, 0) - counts
    middle = (starts + (counts - 1).clamp_min(0) // 2).clamp_max(dev.numel() - 1)
    return torch.where(counts > 0, grouped[middle], torch.full_like(grouped[middle], float("nan")))


class SGGOptimizer(torch.optim.Optimizer):
    """Wraps a torch optimizer, sharing its ``param_groups`` and ``state`` (DeepSpeed sees one).

    Groups flagged ``sgg: True`` are scaled. Adam/AdamW groups take a fused path
    (the same arithmetic as torch's single-tensor AdamW, with the per-element
    factor divided into the denominator); any other optimizer is stepped as is and
    its update rescaled afterwards.

    ``partitioned``: each param is this rank's slice of a layer (ZeRO-1/2 over several
    ranks); a recluster gathers the layer. ``finalize_in_step``: a ``step()`` over all
    param groups finalizes the factors itself (plain use); a caller that steps the
    groups one call at a time (DeepSpeed ZeRO) passes False and calls :meth:`finalize`
    once every group has stepped.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        cfg: SGGConfig,
        partitioned: bool = False,
        finalize_in_step: bool = True,
    ):
        self.inner = inner
        self.cfg = cfg
        self.partitioned = partitioned
        self.finalize_in_step = finalize_in_step
        self._all_groups = inner.param_groups
        self._scale_maps: dict[int, torch.Tensor] = {}
        # reclustered since the last finalize (ZeRO-3 empties the groups' params between steps)
        self._pending_layers: dict[int, torch.Tensor] = {}
        self.last_stats: dict[str, float] | None = None
        self._stats_tensor: torch.Tensor | None = None
        for name in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, name, OrderedDict())
        for group in inner.param_groups:
            group.setdefault("sgg", False)
            group.setdefault("sgg_step", 0)
            group.setdefault("sgg_reclusters", 0)
            group.setdefault("sgg_pending", False)

    # -- shared attributes (DeepSpeed reassigns param_groups while stepping one group) --------
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.inner.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self.inner.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.inner.defaults = value

    def __repr__(self) -> str:
        return (
            f"SGGOptimizer({self.inner!r}, K={self.cfg.clusters}, T={self.cfg.recluster_interval})"
        )

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
        self._all_groups = self.inner.param_groups
        self._scale_maps.clear()
        self._pending_layers = {}
        for st in self.inner.state.values():  # torch casts every state tensor to the param's dtype
            if "sgg_labels" in st and st["sgg_labels"].dtype != torch.uint8:
                st["sgg_labels"] = st["sgg_labels"].to(torch.uint8)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.inner.add_param_group(param_group)

    # -- stepping -----------------------------------------------------------------------------
    def _fast(self, group: dict[str, Any]) -> bool:
        return (
            isinstance(self.inner, torch.optim.Adam)
            and not group.get("amsgrad", False)
            and not group.get("maximize", False)
            and not group.get("capturable", False)
            and not group.get("differentiable", False)
            and not group.get("fused", False)
            and not torch.is_tensor(group["lr"])
            and not any(torch.is_complex(p) for p in group["params"])
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.inner.param_groups
        fast = [g for g in groups if g["sgg"] and self._fast(g)]
        rest = [g for g in groups if not (g["sgg"] and self._fast(g))]
        snapshots: dict[int, torch.Tensor] = {}
        for g in rest:
            if g["sgg"] and g["sgg_reclusters"] > 0:
                for p in g["params"]:
                    if p.grad is not None:
                        snapshots[id(p)] = p.detach().clone()
        if rest:
            self.inner.param_groups = rest
            try:
                self.inner.step()
            finally:
                self.inner.param_groups = groups
        for g in fast:
            self._adam_step(g)
        for g in rest:
            if not g["sgg"]:
                continue
            for p in g["params"]:
                if p.grad is None:
                    continue
                if id(p) in snapshots:
                    p.copy_(torch.lerp(snapshots[id(p)], p, self._scale_map(p)))
                self._after_update(g, p, self._moment(p))
        if self.finalize_in_step and groups is self._all_groups:
            self.finalize()  # every group stepped in this call
        return loss

    def _moment(self, p: torch.Tensor) -> torch.Tensor:
        st = self.inner.state[p]
        for key in ("exp_avg", "momentum_buffer"):
            if key in st and torch.is_tensor(st[key]):
                return st[key]
        if p.grad is None:  # _after_update runs only for parameters that had a gradient
            raise RuntimeError("SGG: a scaled parameter has neither momentum nor gradient")
        return p.grad

    def _adam_step(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        decoupled = group.get("decoupled_weight_decay", isinstance(self.inner, torch.optim.AdamW))
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            st = self.inner.state[p]
            if "exp_avg" not in st:
                st["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype(), device="cpu")
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avg, exp_avg_sq, step_t = st["exp_avg"], st["exp_avg_sq"], st["step"]
            step_t += 1
            if wd != 0:
                if decoupled:
                    p.mul_(1 - lr * wd)
                else:
                    grad = grad.add(p, alpha=wd)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = step_t.item()
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            if group["sgg_reclusters"] > 0:
                # sqrt(v)/c + eps == (sqrt(v) + eps*c)/c with c = sqrt(bias_correction2): the
                # factor division then costs no extra pass over the tensor compared with AdamW.
                c = bias_correction2**0.5
                denom = exp_avg_sq.sqrt().add_(eps * c).div_(self._scale_map(p))
                p.addcdiv_(exp_avg, denom, value=-step_size * c)
            else:  # exactly torch's single-tensor AdamW
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)
            self._after_update(group, p, exp_avg)

    def _scale_map(self, p: torch.Tensor) -> torch.Tensor:
        cached = self._scale_maps.get(id(p))
        if cached is not None:
            return cached
        st = self.inner.state[p]
        factors = st["sgg_scale"].to(p.dtype).index_select(0, st["sgg_labels"].int()).view_as(p)
        if self.cfg.cache_scale_map:
            self._scale_maps[id(p)] = factors
        return factors

    # -- clustering ---------------------------------------------------------------------------
    def _after_update(self, group: dict[str, Any], p: torch.Tensor, moment: torch.Tensor) -> None:
        if p is group["params"][0]:
            group["sgg_step"] += 1
        if group["sgg_step"] % self.cfg.recluster_interval == 0:
            self.recluster(p, moment, numel=group.get("sgg_numel"))
            self._pending_layers[id(p)] = p
            group["sgg_pending"] = True

    def _whole_layer(
        self, moment: torch.Tensor, numel: int | None
    ) -> tuple[torch.Tensor, int, int]:
        """The layer's momentum (fp32, flat, without ZeRO's padding), and where this rank's
        slice starts in it and how long the slice is.

        Partitioned (ZeRO-1/2, several ranks): rank ``r`` holds elements ``[r*n, (r+1)*n)``
        of the padded flat layer, so the ranks' slices in rank order are the layer."""
        local = moment.detach().flatten().float()
        if self.partitioned:
            full = torch.cat(all_gather_tensor(local))
            start = world().rank * local.numel()
        else:
            full, start = local, 0
        if numel is not None:
            full = full[:numel]
        return full, start, local.numel()

    def recluster(self, p: torch.Tensor, moment: torch.Tensor, numel: int | None = None) -> None:
        """Steps 1 and 2 of the formula for one layer: centroids, uint8 labels, per-cluster MDA.

        ``numel``: the layer's size (its param group's ``sgg_numel``); ``p`` may be a padded
        flat partition of it. The clustering always sees the whole layer; ``p`` keeps the
        labels of its own elements (padding gets cluster 0)."""
        cfg, st = self.cfg, self.inner.state[p]
        k = cfg.clusters
        m, start, length = self._whole_layer(moment, numel)
        x = m.abs()
        if "sgg_centroids" not in st:
            st["sgg_centroids"] = initial_centroids(x, k).to(p.dtype)
            st["sgg_counts"] = torch.zeros(k, dtype=p.dtype, device=p.device)
            st["sgg_scale"] = torch.ones(k, dtype=p.dtype, device=p.device)
            st["sgg_labels"] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
        centroids, counts, labels = kmeans_update(
            x,
            st["sgg_centroids"].float(),
            st["sgg_counts"].float(),
            cfg.kmeans_iters,
            cfg.centroid_decay,
        )
        st["sgg_centroids"].copy_(centroids)
        st["sgg_counts"].copy_(counts)
        mine = labels[start : start + length]
        st["sgg_labels"].zero_()
        st["sgg_labels"][: mine.numel()].copy_(mine)
        st["sgg_mda"] = cluster_mda(m, labels, k).to(p.dtype)
        self._scale_maps.pop(id(p), None)

    def finalize(self) -> dict[str, float] | None:
        """Steps 3 and 4 for every layer that reclustered: global MDA, EMA of the factors."""
        pending = [g for g in self._all_groups if g.get("sgg_pending")]
        if not pending:
            return None
        found = list(self._pending_layers.values()) or [p for g in pending for p in g["params"]]
        self._pending_layers = {}
        layers = [p for p in found if "sgg_mda" in self.inner.state.get(p, {})]
        if not layers:
            for g in pending:
                g["sgg_pending"] = False
            return None
        # Pooled over the data-parallel ranks. Each rank clusters whole layers, so under ZeRO
        # the ranks contribute identical copies, and the lower median of k copies of a set is
        # the set's own: D* is the one-rank D*, and the same on every rank.
        mdas = torch.cat([self.inner.state[p]["sgg_mda"].float() for p in layers])
        pool = torch.cat(all_gather_tensor(mdas)) if self.partitioned else mdas
        d_star = lower_median(pool)
        cfg = self.cfg
        for p in layers:
            st = self.inner.state[p]
            d = st["sgg_mda"].float()
            target = (d_star / (d + cfg.eps)).clamp(cfg.scale_min, cfg.scale_max)
            new = cfg.scale_decay * st["sgg_scale"].float() + (1 - cfg.scale_decay) * target
            st["sgg_scale"].copy_(torch.where(torch.isnan(d), st["sgg_scale"].float(), new))
            self._scale_maps.pop(id(p), None)
        for g in pending:
            g["sgg_pending"] = False
            g["sgg_reclusters"] += 1
        return self._record_stats()

    def _record_stats(self) -> dict[str, float]:
        scales = [st["sgg_scale"].float() for st in self.inner.state.values() if "sgg_scale" in st]
        if not scales:
            return {}
        allf = torch.cat(scales)
        stats = torch.stack([allf.min(), lower_median(allf), allf.max()]).tolist()
        self.last_stats = {
            "sgg/scale_min": stats[0],
            "sgg/scale_median": stats[1],
            "sgg/scale_max": stats[2],
        }
        return self.last_stats


def split_layers(setup: Setup, min_ndim: int) -> list[dict[str, Any]]:
    """One group per param of >= ``min_ndim`` dims (``sgg: True``); the rest grouped as before."""
    names = {id(p): n for n, p in setup.model.named_parameters()}
    groups: list[dict[str, Any]] = []
    for group in setup.param_groups:
        keys = {k: v for k, v in group.items() if k != "params"}
        base = keys.get("name", "group")
        small = [p for p in group["params"] if p.dim() < min_ndim]
        for p in group["params"]:
            if p.dim() >= min_ndim:
                groups.append(
                    {
                        **keys,
                        "params": [p],
                        "name": names.get(id(p), base),
                        "sgg": True,
                        "sgg_numel": p.numel(),
                    }
                )
        if small:
            groups.append({**keys, "params": small, "name": f"{base}/small", "sgg": False})
    return groups


class SGG(Technique):
    """Splits param groups per layer, wraps the optimizer, logs the factors' spread."""

    name = "sgg"
    capabilities = frozenset({Capability.CONFIGURES})

    def __init__(self, cfg: SGGConfig, zero_stage: int):
        self.cfg = cfg
        self.zero_stage = zero_stage
        self.wrapper: SGGOptimizer | None = None

    def configure(self, setup: Setup) -> None:
        setup.param_groups = split_layers(setup, self.cfg.min_ndim)
        # DeepSpeed asserts on client optimizers it does not know under ZeRO; SGG is tested here.
        setup.ds_config["zero_allow_untested_optimizer"] = True
        partitioned = self.zero_stage >= 1 and setup.world_size > 1

        def wrap(optimizer: torch.optim.Optimizer) -> SGGOptimizer:
            # ZeRO-1/2 steps the groups one call at a time: finalized in on_step_end, once
            self.wrapper = SGGOptimizer(
                optimizer, self.cfg, partitioned=partitioned, finalize_in_step=False
            )
            return self.wrapper

        setup.wrap_optimizer.append(wrap)

    def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> Decision:
        """The step's one finalize: every param group has stepped (any ZeRO stage)."""
        if self.wrapper is not None:
            for name, value in (self.wrapper.finalize() or {}).items():
                state.record(name, value)
        return Decision()


SPEC = TechniqueSpec(catalog.SGG, build=lambda cfg, recipe: SGG(cfg, recipe.zero_stage))
