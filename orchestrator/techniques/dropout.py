"""Dropout schedules: standard, early and late dropout / stochastic depth (Liu et al., ICML 2023).

"Dropout Reduces Underfitting" updates the rate every optimizer step. For step ``k``
(0-based, the step about to run), rate ``r`` and cut-off ``C`` steps (``T`` in all):

* ``standard``: ``r`` throughout (``schedule`` must be ``constant``);
* ``early`` + ``constant``: ``r`` for ``k < C``, then 0;
* ``early`` + ``linear``: ``r * (1 - k / (C - 1))`` for ``k < C`` (the paper's
  ``np.linspace(r, 0, C)``), then 0;
* ``late`` + ``constant``: 0 for ``k < C``, then ``r`` (the paper's late dropout);
* ``late`` + ``linear``: 0 for ``k < C``, then a ramp reaching ``r`` at ``T - 1`` (an
  extension; the paper only defines a constant late phase).

The rate is a pure function of the step, so a resumed run needs no extra state.

Where the rate goes (``target``):

* ``dropout``: ``p`` of every ``nn.Dropout``-family module; float attributes that HF
  attention/blocks read at forward time (``attention_dropout`` on LLaMA, Mistral, Qwen2/3,
  Gemma/Gemma2, Phi-3, Mixtral, OLMo2, GPT-NeoX, ViT attention, ...; ``dropout`` /
  ``activation_dropout`` on OPT / BART-style layers; ``hidden_dropout`` on Falcon); and
  the same-named numeric fields of every HF ``config`` object in the model (Falcon reads
  ``config.attention_dropout``/``config.hidden_dropout`` inside ``forward``). GPT-2, BERT,
  GPT-NeoX hidden dropout and Phi-3 residual dropout are ``nn.Dropout`` modules. All sites
  get the same rate, as in the paper's reference code.
* ``drop_path`` (stochastic depth): modules with a float ``drop_prob`` (timm ``DropPath``,
  HF ``*DropPath``, Regimen's ViT), torchvision-style ``StochasticDepth`` (``p``), and
  float ``drop_path`` / ``drop_path_rate`` attributes. Each site keeps its build-time share
  of the maximum (the usual linear-in-depth profile): ``rate_site = rate * built / max_built``.

The sites and their shares are found once, at the first engine build, and kept for the
model's lifetime. ``configure`` runs again on every engine rebuild (LISA's layer switches),
when the model holds the rates of the previous step: re-deriving the shares from those
would lose the profile, and after an early cut-off (all rates 0) find no drop-path site at
all. A resumed run builds the model afresh at its maximum rates, so the shares need no state.

A model built with rate 0 often has no dropout left to schedule (``nn.Identity`` in
place of ``DropPath``, no ``nn.Dropout`` at all): ``configure`` raises a clear error
telling to build the model with the maximum rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator.errors import UsageError
from orchestrator.recipe import catalog
from orchestrator.recipe.techniques.dropout import DropoutConfig, scheduled_rate
from orchestrator.techniques.base import (
    Capability,
    Context,
    Setup,
    Technique,
    TrainState,
)
from orchestrator.techniques.registry import TechniqueSpec

# Float attributes that HF modules read in forward() as a dropout probability.
DROPOUT_ATTRS = (
    "attention_dropout",
    "attn_dropout",
    "dropout",
    "hidden_dropout",
    "activation_dropout",
    "dropout_rate",
    "dropout_p",
    "dropout_prob",
)
# HF config fields holding dropout probabilities (some are read at forward time, e.g. Falcon).
DROPOUT_CONFIG_KEYS = (
    "attention_dropout",
    "hidden_dropout",
    "activation_dropout",
    "dropout",
    "attention_probs_dropout_prob",
    "hidden_dropout_prob",
    "attn_pdrop",
    "resid_pdrop",
    "embd_pdrop",
)
DROP_PATH_ATTRS = ("drop_prob", "drop_path", "drop_path_rate")


@dataclass
class Sites:
    """Where a model's rates live (and each drop-path site's share), found at the first build."""

    modules: list[torch.nn.Module] = field(default_factory=list)  # nn.Dropout family
    attrs: list[tuple[Any, str]] = field(default_factory=list)  # (module, float attribute)
    configs: list[tuple[Any, str]] = field(default_factory=list)  # (HF config, field)
    paths: list[tuple[Any, str, float]] = field(default_factory=list)  # (owner, attr, share)
    identity_dropout: list[str] = field(default_factory=list)
    identity_paths: list[str] = field(default_factory=list)

    @property
    def dropout_count(self) -> int:
        return len(self.modules) + len(self.attrs)


def _is_rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


def find_sites(model: torch.nn.Module) -> Sites:
    """Every dropout / drop-path rate in ``model`` that a schedule can set."""
    sites = Sites()
    configs: dict[int, Any] = {}
    built_paths: list[tuple[Any, str, float]] = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            sites.modules.append(module)
        elif cls == "StochasticDepth" and _is_rate(getattr(module, "p", None)):
            built_paths.append((module, "p", float(module.p)))  # type: ignore[arg-type]
        for attr in DROPOUT_ATTRS:
            if _is_rate(module.__dict__.get(attr)):
                sites.attrs.append((module, attr))
        for attr in DROP_PATH_ATTRS:
            if _is_rate(module.__dict__.get(attr)):
                built_paths.append((module, attr, float(module.__dict__[attr])))
        for child_name, child in module.named_children():
            if not isinstance(child, torch.nn.Identity):
                continue
            full = f"{name}.{child_name}" if name else child_name
            low = child_name.lower()
            if low.startswith("drop_path") or "droppath" in low or "stochastic" in low:
                sites.identity_paths.append(full)
            elif "drop" in low:
                sites.identity_dropout.append(full)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict") and id(config) not in configs:
            configs[id(config)] = config
    for config in configs.values():
        for key in DROPOUT_CONFIG_KEYS:
            if _is_rate(getattr(config, key, None)):
                sites.configs.append((config, key))
        if _is_rate(getattr(config, "drop_path_rate", None)):
            built_paths.append((config, "drop_path_rate", float(config.drop_path_rate)))
    top = max((b for _, _, b in built_paths), default=0.0)
    sites.paths = [(o, a, (b / top if top > 0 else 0.0)) for o, a, b in built_paths]
    return sites


def _rate_zero_error(what: str, identities: list[str], hint: str) -> UsageError:
    shown = ", ".join(identities[:4]) + (" ..." if len(identities) > 4 else "")
    found = (
        f"{len(identities)} {what} site(s) are nn.Identity ({shown}), i.e. the model was "
        "built with rate 0 and the layer was removed"
        if identities
        else f"the model has no {what} that Regimen can set"
    )
    return UsageError(
        f"techniques.dropout: target needs {what}, but {found}. Build the model with the "
        f"maximum rate ({hint}); Regimen then sets the rate every step, including 0."
    )


class DropoutSchedule(Technique):
    """Sets every dropout / drop-path rate of the model at the start of every optimizer step."""

    name = "dropout"
    capabilities = frozenset({Capability.CONFIGURES})

    def __init__(self, cfg: DropoutConfig):
        self.cfg = cfg
        self.sites: Sites | None = None
        self._sites_of: torch.nn.Module | None = None  # the model ``sites`` were found in
        self._model: torch.nn.Module | None = None

    @property
    def _dropout(self) -> bool:
        return self.cfg.target in ("dropout", "both")

    @property
    def _paths(self) -> bool:
        return self.cfg.target in ("drop_path", "both")

    def attach(self, model: torch.nn.Module) -> Sites:
        """Find the model's rate sites from its current rates (the build-time ones, before
        the first :meth:`apply`); raise when the target has none (built with rate 0)."""
        sites = find_sites(model)
        if self._dropout and sites.dropout_count == 0:
            raise _rate_zero_error(
                "dropout",
                sites.identity_dropout,
                "e.g. nn.Dropout(p) with p > 0, or the HF config's attention_dropout / "
                "hidden_dropout",
            )
        if self._paths and not any(share > 0 for _, _, share in sites.paths):
            raise _rate_zero_error(
                "drop_path (stochastic depth)",
                sites.identity_paths,
                "e.g. drop_path_rate > 0 so that DropPath modules exist",
            )
        self.sites, self._sites_of = sites, model
        return sites

    def configure(self, setup: Setup) -> None:
        """Find the sites at the first build; an engine rebuild on the same model keeps them
        (its rates are the last step's by then, not the build-time profile)."""
        if self.sites is None or self._sites_of is not setup.model:
            self.attach(setup.model)

    def rates(self, step: int, total_steps: int) -> tuple[float, float]:
        """(dropout rate, drop-path rate) of step ``step``."""
        cfg = self.cfg
        return (
            scheduled_rate(cfg, cfg.rate, step, total_steps) if self._dropout else 0.0,
            scheduled_rate(cfg, cfg.path_rate, step, total_steps) if self._paths else 0.0,
        )

    def apply(self, step: int, total_steps: int) -> tuple[float, float]:
        """Write the rates of ``step`` into the model."""
        if self.sites is None:
            raise RuntimeError("dropout schedule: attach() or configure() first")
        rate, path_rate = self.rates(step, total_steps)
        if self._dropout:
            for module in self.sites.modules:
                module.p = rate  # type: ignore[assignment]
            for owner, attr in self.sites.attrs + self.sites.configs:
                setattr(owner, attr, rate)
        if self._paths:
            for owner, attr, share in self.sites.paths:
                setattr(owner, attr, path_rate * share)
        return rate, path_rate

    def _apply_state(self, state: TrainState) -> None:
        if self.sites is None and self._model is not None:
            self.attach(self._model)
        rate, path_rate = self.apply(state.step, state.total_steps)
        if self._dropout:
            state.record("dropout/rate", rate)
        if self._paths:
            state.record("dropout/drop_path_rate", path_rate)

    def bind(self, ctx: Context) -> None:
        self._model = ctx.model

    def on_train_start(self, state: TrainState) -> None:
        self._apply_state(state)

    def on_step_begin(self, state: TrainState) -> None:
        self._apply_state(state)
        cfg = self.cfg
        if cfg.mode != "standard" and state.step == cfg.resolved_cutoff(state.total_steps) > 0:
            # the phase boundary: the loss and the gradients change on purpose (late dropout
            # raises the loss), so the spike guard restarts its statistics
            state.mark_regime_change()


SPEC = TechniqueSpec(catalog.DROPOUT, build=lambda cfg, recipe: DropoutSchedule(cfg))
