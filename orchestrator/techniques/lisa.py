"""LISA: layerwise importance sampling (Pan et al. 2024), optimizer state only for the active set.

Embeddings, head and the final norm train at every step (each switchable);
``gamma`` of the ``L`` transformer layers are sampled every ``interval`` optimizer
steps (uniformly, or by ``weights`` without replacement). Interval ``i`` covers
steps ``[i*K, (i+1)*K)``; its layers are a pure function of ``(recipe.seed, i)``,
computed identically on every rank and broadcast from rank 0 as a safeguard.

Memory: at every switch (always at an optimizer-step boundary: ``on_step_begin``)
the inactive layers get ``requires_grad = False`` and LISA asks the loop for an
engine rebuild. ``configure`` then hands the optimizer only the active
parameters (the always-on ones first, then one group per active layer), and
``deepspeed.initialize`` builds a new ZeRO-0/1/2 optimizer whose moments and fp32
partitions cover only those. The old engine is released (hooks removed,
destroyed, garbage-collected) and LISA checks it is really gone
(``lisa/old_state_freed``). So optimizer state is ``always-on + gamma layers``
and never grows back as layers are visited (LMFlow/Axolotl only toggle
``requires_grad``; under ZeRO their frozen layers never train, DeepSpeed #5639).

The always-on groups keep their AdamW moments (and, under ZeRO-1/2, their fp32
master partition) across switches: they are carried into the new optimizer
before its first step (``keep_always_on_state``). A re-activated layer starts
with fresh moments, as after the per-interval reload of the paper's authors.

ZeRO-3 is rejected: it partitions the parameters themselves at ``initialize``
and a re-initialisation on the same module would re-partition live parameters.

State (in every checkpoint): the interval index and the active layers; on
resume the engine is built for the saved active set before DeepSpeed loads the
optimizer shards, and the layer sequence continues unchanged.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.distributed import broadcast_
from orchestrator.errors import UsageError
from orchestrator.recipe import catalog
from orchestrator.recipe.techniques.lisa import LisaConfig, sample_layers
from orchestrator.techniques.base import (
    Capability,
    Context,
    Decision,
    Setup,
    Technique,
    TrainState,
)
from orchestrator.techniques.registry import TechniqueSpec

if TYPE_CHECKING:
    pass

# Where common HF causal LMs keep their transformer blocks (tried in order).
LAYER_PATHS = (
    "model.layers",  # LLaMA, Mistral, Qwen2, Gemma, Phi-3
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "transformer.blocks",  # MPT
    "transformer.layers",
    "layers",
    "base_model.model.model.layers",  # peft-wrapped LLaMA family
)
_HEAD_NAMES = ("lm_head", "score", "classifier", "embed_out")
_MASK_LIMIT = 52  # a float64 metric holds an exact bitmask of up to 53 bits


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layers(model: torch.nn.Module, path: str | None = None) -> tuple[str, torch.nn.ModuleList]:
    """The model's transformer blocks: ``path`` if given, else the first known HF location."""
    for candidate in [path] if path else LAYER_PATHS:
        found = _get(model, candidate)
        if isinstance(found, torch.nn.ModuleList) and len(found) > 0:
            return candidate, found
    if path:
        raise UsageError(
            f"techniques.lisa.layers_path: '{path}' is not a non-empty nn.ModuleList of the model"
        )
    raise UsageError(
        f"techniques.lisa: no layer list found at {', '.join(LAYER_PATHS)}: "
        "set techniques.lisa.layers_path to the dotted path of the model's ModuleList of blocks"
    )


def classify_params(model: torch.nn.Module, layers: torch.nn.ModuleList) -> dict[int, str]:
    """id(param) -> ``layer.<i>``, ``embeddings``, ``head`` or ``final_norm`` (everything else)."""
    units: dict[int, str] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            units[id(p)] = f"layer.{i}"
    head_params: set[int] = set()
    get_head = getattr(model, "get_output_embeddings", None)
    out = get_head() if callable(get_head) else None
    heads = [out] if isinstance(out, torch.nn.Module) else []
    heads += [m for n, m in model.named_children() if n in _HEAD_NAMES]
    for m in heads:
        head_params.update(id(p) for p in m.parameters())
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            for p in module.parameters():
                units.setdefault(id(p), "embeddings")  # a tied head stays 'embeddings'
    for p in model.parameters():
        units.setdefault(id(p), "head" if id(p) in head_params else "final_norm")
    return units


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of optimizer state on this rank: the torch optimizer's state tensors plus
    DeepSpeed's fp32 master partitions (ZeRO-1/2, bf16), each storage counted once."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if torch.is_tensor(t) and t.numel() > 0:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()

    opt, inner = optimizer, optimizer
    for _ in range(4):  # DeepSpeed ZeRO / SGG wrappers keep the torch optimizer in .optimizer
        for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
            for t in getattr(opt, attr, None) or []:
                add(t)
        if isinstance(opt, torch.optim.Optimizer):
            inner = opt
            break
        nxt = getattr(opt, "optimizer", None)
        if nxt is None:
            break
        opt = nxt
    for st in getattr(inner, "state", {}).values():
        for t in st.values():
            add(t)
    return total


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    opt = optimizer
    for _ in range(4):
        if isinstance(opt, torch.optim.Optimizer):
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


class Lisa(Technique):
    """Samples the active layers, shapes the param groups, asks for engine rebuilds."""

    name = "lisa"
    capabilities = frozenset({Capability.CONFIGURES})

    def __init__(self, cfg: LisaConfig, seed: int):
        self.cfg = cfg
        self._ctx: Context | None = None
        self.seed = seed
        self.interval = 0
        self.active: list[int] | None = None
        self.n_layers: int | None = None
        self._units: dict[int, str] = {}
        self._template: list[tuple[dict[str, Any], list[torch.nn.Parameter]]] | None = None
        self._base_trainable: set[int] = set()
        self._model: torch.nn.Module | None = None
        self._state: TrainState | None = None
        self._n_always_groups = 0
        self._carry: dict[str, Any] | None = None
        self._old_optimizer: weakref.ref[Any] | None = None
        self._switched = False
        self._fresh_from = -1  # the step the active layers were switched in with fresh moments

    # -- active set -----------------------------------------------------------------------
    def _always_on(self, unit: str) -> bool:
        c = self.cfg
        return {
            "embeddings": c.train_embeddings,
            "head": c.train_head,
            "final_norm": c.train_final_norm,
        }.get(unit, False)

    def _sample(self, interval: int) -> list[int]:
        layers = sample_layers(self.cfg, self.n_layers or 0, self.seed, interval)
        t = torch.tensor(layers + [-1] * (self.cfg.gamma - len(layers)), dtype=torch.int64)
        broadcast_(t, src=0)  # every rank computed the same; rank 0's list rules regardless
        layers = [int(i) for i in t.tolist() if i >= 0]
        return layers

    def _apply_requires_grad(self) -> None:
        active = {f"layer.{i}" for i in self.active or []}
        if self._model is None:
            raise RuntimeError("LISA: configure() has not seen the model yet")
        for p in self._model.parameters():
            if id(p) in self._base_trainable:
                unit = self._units.get(id(p), "final_norm")
                p.requires_grad_(unit in active or self._always_on(unit))

    def _bind(self, setup: Setup) -> None:
        """First configure: find the layers, remember the groups as the loop made them."""
        self._model = setup.model
        _, layers = find_layers(setup.model, self.cfg.layers_path)
        self.n_layers = len(layers)
        if self.cfg.gamma > self.n_layers:
            raise UsageError(
                f"techniques.lisa.gamma: {self.cfg.gamma} is more than the model's "
                f"{self.n_layers} layers"
            )
        if self.cfg.weights is not None and len(self.cfg.weights) != self.n_layers:
            raise UsageError(
                f"techniques.lisa.weights: {len(self.cfg.weights)} weights for "
                f"{self.n_layers} layers: give one per layer"
            )
        if self.active is not None and any(not 0 <= i < self.n_layers for i in self.active):
            raise UsageError(
                f"techniques.lisa: saved active layers {self.active} do not fit this model"
            )
        self._units = classify_params(setup.model, layers)
        self._template = [
            ({k: v for k, v in g.items() if k != "params"}, list(g["params"]))
            for g in setup.param_groups
        ]
        self._base_trainable = {id(p) for _, ps in self._template for p in ps}

    def configure(self, setup: Setup) -> None:
        if self._template is None or self._model is not setup.model:
            self._bind(setup)
        if self.active is None:
            self.active = self._sample(self.interval)
        self._apply_requires_grad()
        self._free_check()
        if self._template is None:
            raise RuntimeError("LISA: configure() has not seen the param groups yet")
        always: list[dict[str, Any]] = []
        per_layer: list[dict[str, Any]] = []
        for i in self.active:
            for keys, params in self._template:
                ps = [p for p in params if self._units.get(id(p)) == f"layer.{i}"]
                if ps:
                    per_layer.append(
                        {**keys, "params": ps, "name": f"{keys.get('name', 'group')}/layer.{i}"}
                    )
        for keys, params in self._template:
            ps = [p for p in params if self._always_on(self._units.get(id(p), "final_norm"))]
            if ps:
                always.append({**keys, "params": ps, "name": f"{keys.get('name', 'group')}/always"})
        self._n_always_groups = len(always)
        setup.param_groups = always + per_layer

    # -- hooks ----------------------------------------------------------------------------
    def bind(self, ctx: Context) -> None:
        self._ctx = ctx

    def _engine(self) -> Any:
        return self._ctx.engine if self._ctx is not None else None

    def on_train_start(self, state: TrainState) -> None:
        self._state = state
        self._switched = True  # report the initial set

    def on_step_begin(self, state: TrainState) -> None:
        self._state = state
        interval = state.step // self.cfg.interval
        if interval == self.interval and self.active is not None:
            return
        previous = self.active
        self.interval = interval
        self.active = self._sample(interval)
        if self.active == previous:
            self._switched = True
            return  # same layers drawn again: the optimizer (and its moments) stay
        self._capture(self._engine())
        self._apply_requires_grad()
        state.request_rebuild()
        if previous is not None:  # other layers train: the gradient norm is another quantity
            state.mark_regime_change(("grad_norm",))
            self._fresh_from = state.step  # their moments start at zero: re-warm their LR
        self._switched = True

    def on_before_optimizer_step(self, state: TrainState) -> Decision:
        if self._carry is not None:
            self._restore_carry(self._engine())
        self._rewarm(state)
        return Decision()

    def _rewarm(self, state: TrainState) -> None:
        """Scale the fresh layers' LR (the loop set it for this step) while they re-warm."""
        n, engine = min(self.cfg.rewarm_steps, self.cfg.interval - 1), self._engine()
        done = state.step - self._fresh_from
        if n == 0 or self._fresh_from < 0 or done >= n or engine is None:
            return
        factor = (done + 1) / (n + 1)
        for group in engine.optimizer.param_groups[self._n_always_groups :]:  # the layers' groups
            group["lr"] = group["lr"] * factor

    def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> Decision:
        engine = self._engine()
        new: dict[str, float] = {}
        if engine is not None:
            new["lisa/optimizer_state_bytes"] = float(optimizer_state_bytes(engine.optimizer))
        if self._switched:
            self._switched = False
            active = self.active or []
            if (self.n_layers or 0) <= _MASK_LIMIT:
                new["lisa/active_mask"] = float(sum(1 << i for i in active))
            new["lisa/interval"] = float(self.interval)
            if "engine_rebuild_s" in state.metrics:
                new["lisa/switch_s"] = state.metrics["engine_rebuild_s"]
            if self._old_optimizer is not None:
                new["lisa/old_state_freed"] = float(self._old_optimizer() is None)
                self._old_optimizer = None
            state.emit(
                "lisa_switch",
                interval=self.interval,
                layers=list(active),
                optimizer_state_bytes=int(new.get("lisa/optimizer_state_bytes", 0)),
                switch_s=new.get("lisa/switch_s"),
            )
        for name, value in new.items():
            state.record(name, value)
        return Decision()

    # -- carrying the always-on state across a rebuild -------------------------------------
    def _capture(self, engine: Any) -> None:
        """Before the rebuild: keep (only) the always-on groups' state; watch the old optimizer."""
        self._carry = None
        if engine is None:
            return
        ds_opt = engine.optimizer
        self._old_optimizer = weakref.ref(ds_opt)
        if not self.cfg.keep_always_on_state or self._n_always_groups == 0:
            return
        inner = _torch_optimizer(ds_opt)
        if inner is None:
            return
        masters = getattr(ds_opt, "single_partition_of_fp32_groups", None)
        groups = inner.param_groups[: self._n_always_groups]
        if masters is not None:  # ZeRO-1/2: one flat fp32 partition per group
            self._carry = {
                "zero": True,
                "groups": [
                    (masters[g], inner.state.get(masters[g], {})) for g in range(len(groups))
                ],
            }
        else:
            self._carry = {
                "zero": False,
                "params": {p: inner.state.get(p, {}) for g in groups for p in g["params"]},
            }

    def _restore_carry(self, engine: Any) -> None:
        carry, self._carry = self._carry, None
        inner = _torch_optimizer(engine.optimizer) if engine is not None else None
        if carry is None or inner is None:
            return
        if carry["zero"]:
            masters = getattr(engine.optimizer, "single_partition_of_fp32_groups", None) or []
            for g, (old_master, st) in enumerate(carry["groups"]):
                if g >= len(masters) or masters[g].shape != old_master.shape:
                    return  # groups differ (should not happen): fresh state, as without carrying
                with torch.no_grad():
                    masters[g].copy_(old_master)
                if st:
                    inner.state[masters[g]] = st
        else:
            for p, st in carry["params"].items():
                if st:
                    inner.state[p] = st

    def _free_check(self) -> None:
        if self._old_optimizer is not None and self._old_optimizer() is not None:
            gc.collect()

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "active": list(self.active) if self.active is not None else None,
            "seed": self.seed,
            "fresh_from": self._fresh_from,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        before = self.active
        self.interval = int(state["interval"])
        self.active = None if state.get("active") is None else [int(i) for i in state["active"]]
        self._fresh_from = int(state.get("fresh_from", -1))
        self._carry = None
        if self._state is not None and self._model is not None and self.active != before:
            # a rollback in place: rebuild for the restored set before DeepSpeed loads the shards
            if self.active is None:
                self.active = self._sample(self.interval)
            self._apply_requires_grad()
            self._state.request_rebuild()


SPEC = TechniqueSpec(catalog.LISA, build=lambda cfg, recipe: Lisa(cfg, recipe.seed))
