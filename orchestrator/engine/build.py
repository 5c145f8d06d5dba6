"""Building the DeepSpeed engine: techniques shape it, ``deepspeed.initialize`` makes it,
:func:`release_engine` lets it go (an engine rebuild, e.g. LISA's layer switch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.engine.ds_config import build_ds_config
from orchestrator.engine.optim import StepGate, build_optimizer, optimizer_on_cuda
from orchestrator.techniques.base import Capability, Setup, Technique, has

if TYPE_CHECKING:
    import torch

    from orchestrator.recipe.schema import Recipe


@dataclass
class Built:
    """The DeepSpeed engine and what the loop needs next to it."""

    engine: Any
    gate: StepGate
    optimizer: Any


def initialize_engine(
    model: torch.nn.Module, techniques: list[Technique], recipe: Recipe, rank: int, world_size: int
) -> Built:
    """Let techniques shape param groups and config, then ``deepspeed.initialize``."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    setup = Setup(
        recipe=recipe,
        model=model,
        param_groups=[{"params": params, "name": "all"}],
        ds_config=build_ds_config(recipe),
        rank=rank,
        world_size=world_size,
    )
    for technique in techniques:
        if has(technique, Capability.CONFIGURES):
            technique.configure(setup)
    from deepspeed.accelerator import get_accelerator

    fused = optimizer_on_cuda(get_accelerator().device_name(), setup.ds_config)
    optimizer = build_optimizer(setup.param_groups, recipe.optimizer, fused=fused)
    for wrap in setup.wrap_optimizer:
        optimizer = wrap(optimizer)
    gate = StepGate(optimizer)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=setup.ds_config, dist_init_required=False
    )
    return Built(engine=engine, gate=gate, optimizer=optimizer)


def release_engine(engine: Any) -> None:
    """Make a DeepSpeed engine collectable: ``destroy()`` (ZeRO grad hooks) and remove the
    forward hooks it put on the module, whose closures would otherwise keep the engine, its
    optimizer and all optimizer state alive as long as the module lives."""
    if hasattr(engine, "destroy"):
        engine.destroy()
    for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = getattr(engine, name, None)
        if handle is not None and hasattr(handle, "remove"):
            handle.remove()
            setattr(engine, name, None)
