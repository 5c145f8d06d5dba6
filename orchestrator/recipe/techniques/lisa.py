"""`techniques.lisa`: the config of layerwise importance sampling, its layer draw, checks, plan.

``gamma`` of the model's transformer layers train per interval of ``interval`` steps;
interval ``i``'s layers are a pure function of ``(recipe.seed, i)`` (:func:`sample_layers`).
The technique (engine rebuilds, optimizer state) is :mod:`orchestrator.techniques.lisa`.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from orchestrator.recipe.sections import TechniqueConfig

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe


class LisaConfig(TechniqueConfig):
    """`techniques.lisa`: `gamma` sampled layers + always-on parts train; redrawn per `interval`."""

    gamma: int = Field(2, ge=0, description="Layers trained per interval (paper: 1-2).")
    interval: int = Field(20, ge=1, description="K, optimizer steps between switches.")
    train_embeddings: bool = Field(True, description="Input embeddings always train.")
    train_head: bool = Field(True, description="LM head (output embeddings) always trains.")
    train_final_norm: bool = Field(
        True,
        description="Every other parameter outside the layers (final norm, ...) always trains.",
    )
    weights: list[float] | None = Field(
        None,
        description="Sampling weight per layer (sampled without replacement); default uniform.",
    )
    layers_path: str | None = Field(
        None,
        description="Dotted path of the layer ModuleList, e.g. 'model.layers'; default: detected.",
    )
    rewarm_steps: int = Field(
        3,
        ge=0,
        description="After a switch to other layers, ramp their LR over this many steps "
        "(1/(n+1), 2/(n+1), ...; at most interval - 1): their AdamW moments start at zero, so "
        "the first update is lr x sign(g) on every element, which spiked the loss at a high LR.",
    )
    keep_always_on_state: bool = Field(
        True,
        description="Carry the always-on params' moments (and ZeRO fp32 master) across switches.",
    )

    @model_validator(mode="after")
    def _weights_ok(self) -> LisaConfig:
        if self.weights is not None:
            if any(w < 0 for w in self.weights):
                raise ValueError("weights must be >= 0 (one per layer)")
            if sum(1 for w in self.weights if w > 0) < self.gamma:
                raise ValueError(
                    f"weights give fewer than gamma={self.gamma} layers a positive weight"
                )
        nothing = self.gamma == 0 and not (
            self.train_embeddings or self.train_head or self.train_final_norm
        )
        if nothing:
            raise ValueError("gamma is 0 and no always-on part trains: nothing would train")
        return self


def sample_layers(cfg: LisaConfig, n_layers: int, seed: int, interval: int) -> list[int]:
    """The active layers of ``interval`` (sorted): a pure function of (seed, interval).

    Uniform without replacement, or, with ``weights``, weighted without replacement
    (each layer keyed by ``u ** (1 / w)``, the largest keys win: Efraimidis and Spirakis).
    Python's own seeded generator, so `regimen plan` and training agree without torch.
    """
    rng = random.Random(int(seed) * 1_000_003 + int(interval) + 1)
    if cfg.gamma == 0:
        return []
    if cfg.weights is None:
        return sorted(rng.sample(range(n_layers), cfg.gamma))
    keys = [
        (rng.random() ** (1.0 / w) if w > 0 else -1.0, layer) for layer, w in enumerate(cfg.weights)
    ]
    return sorted(layer for _, layer in sorted(keys, reverse=True)[: cfg.gamma])


def layer_count(recipe: Recipe) -> int | None:
    """Layers of an `hf_config` model, known without building it; None when unknown."""
    model = recipe.model
    if model.kind != "hf_config":
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in model.config:
            value = model.config[key]  # a wrong type is model_problems' to report
            return value if isinstance(value, int) and not isinstance(value, bool) else None
    # transformers' default depth, from the shipped table (tests/unit/recipe/test_light.py
    # checks it against the installed transformers, which imports torch)
    from orchestrator.recipe.hf_models import default_layers, table_applies

    return default_layers(model.architecture) if table_applies() else None


def check(cfg: LisaConfig, recipe: Recipe) -> list[tuple[str, str]]:
    """No ZeRO-3; gamma and weights fit the model's layer count (where it is known)."""
    problems: list[tuple[str, str]] = []
    if recipe.zero_stage >= 3:
        problems.append(
            (
                "techniques.lisa",
                "LISA cannot run under ZeRO-3: ZeRO-3 partitions the parameters themselves "
                "at deepspeed.initialize, and LISA rebuilds the engine for each new layer set, "
                "which would re-partition live parameters; use deepspeed.zero_optimization.stage "
                "2 (LISA already keeps optimizer state only for the active layers)",
            )
        )
    n = layer_count(recipe)
    if n is not None:
        if cfg.gamma > n:
            problems.append(
                (
                    "techniques.lisa.gamma",
                    f"{cfg.gamma} is more than the model's {n} layers: use 1..{n}",
                )
            )
        if cfg.weights is not None and len(cfg.weights) != n:
            problems.append(
                (
                    "techniques.lisa.weights",
                    f"{len(cfg.weights)} weights for a {n}-layer model: give one per layer",
                )
            )
    return problems


def describe(cfg: LisaConfig, recipe: Recipe) -> dict[str, object]:
    """Switch steps, the always-on parts and (layer count known) the first active sets."""
    steps, k = recipe.schedule.steps, cfg.interval
    switches = list(range(k, steps, k))
    always = [n for n, on in (("embeddings", cfg.train_embeddings), ("head", cfg.train_head),
                              ("final_norm", cfg.train_final_norm)) if on]  # fmt: skip
    out: dict[str, object] = {
        "gamma": cfg.gamma,
        "interval": k,
        "always_on": always,
        "switch_steps": switches[:8]
        + ([f"... ({len(switches)} in all)"] if len(switches) > 8 else []),
    }
    n = layer_count(recipe)
    if n is not None and cfg.gamma <= n and (cfg.weights is None or len(cfg.weights) == n):
        out["layers"] = n
        out["active_from_step"] = {
            i * k: sample_layers(cfg, n, recipe.seed, i) for i in range(min(6, len(switches) + 1))
        }
    return out
