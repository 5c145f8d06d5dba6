"""What `regimen plan` shows: each variant's schedule, without training."""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from orchestrator.recipe.catalog import enabled
from orchestrator.recipe.deepspeed import resolved_autos, resolved_config
from orchestrator.recipe.expand import Variant

MAX_LISTED_CHECKPOINTS = 1000


def checkpoint_steps(steps: int, every: int, at_end: bool, limit: int) -> tuple[list[int], int]:
    """The first ``limit`` checkpoint steps and how many there are in all (never materialised)."""
    periodic = (steps - 1) // every if every else 0  # every, 2*every, ... below steps
    listed = [every * i for i in range(1, min(periodic, limit) + 1)]
    total = periodic + (1 if at_end else 0)
    if at_end and len(listed) < limit:
        listed.append(steps)
    return listed, total


def plan_of(variant: Variant) -> dict[str, Any]:
    """A JSON-able description of one variant's run: batches, checkpoints, techniques, user code,
    and the DeepSpeed config it runs with (``deepspeed``; each `"auto"` resolved in
    ``deepspeed_auto``).

    ``checkpoints`` lists at most 1,000 steps; ``checkpoint_count`` is the full number.
    """
    r = variant.recipe
    steps = r.schedule.steps
    checkpoints, count = checkpoint_steps(
        steps, r.checkpoint.every, r.checkpoint.at_end, MAX_LISTED_CHECKPOINTS
    )
    techniques: dict[str, Any] = {}
    for entry, cfg in enabled(r):
        techniques[entry.name] = entry.describe(cfg, r) if entry.describe else {}
    user_code = [
        f"{where}: {ref}"
        for where, ref in (("model.factory", r.model.factory), ("data.factory", r.data.factory))
        if ref
    ]
    return {
        "variant": variant.name,
        "assignments": variant.assignments,
        "steps": steps,
        "global_batch_size": r.global_batch_size,
        "samples": steps * r.global_batch_size,
        "workers": r.resources.workers,
        "device_per_worker": r.resources.device,  # as each worker will decide it
        "gpus_per_worker": r.resources.gpus_per_worker,
        "zero_stage": r.zero_stage,
        "precision": r.precision,
        "checkpoints": checkpoints,
        "checkpoint_count": count,
        "techniques": techniques,
        "user_code": user_code,
        "deepspeed": resolved_config(r),
        "deepspeed_auto": resolved_autos(r),
    }


def render_plan(plan: dict[str, Any]) -> str:
    """The plan as readable text for the terminal (rich markup; user text is escaped)."""
    lines = [f"[bold]{escape(plan['variant'])}[/]"]
    if plan["assignments"]:
        sweep = ", ".join(f"{k}={_short(v)}" for k, v in plan["assignments"].items())
        lines.append("  sweep: " + escape(sweep))
    lines.append(
        f"  {plan['steps']} steps x {plan['global_batch_size']} samples "
        f"({plan['workers']} workers, each on {_device(plan)}, "
        f"ZeRO-{plan['zero_stage']}, {plan['precision']})"
    )
    cks = plan["checkpoints"]
    count = plan.get("checkpoint_count", len(cks))
    shown = ", ".join(map(str, cks[:6])) + (f", ... ({count} in all)" if count > 6 else "")
    lines.append(f"  checkpoints at: {shown or 'none'}")
    for name, info in plan["techniques"].items():
        listed = {k: v for k, v in info.items() if isinstance(v, list) and k == "stages"}
        text = ", ".join(f"{k}={_short(v)}" for k, v in info.items() if k not in listed)
        lines.append(f"  {name}: " + escape(text))
        lines += [f"    {escape(str(item))}" for items in listed.values() for item in items]
    if autos := plan.get("deepspeed_auto"):
        resolved = ", ".join(f"{k}={_short(v)}" for k, v in autos.items())
        lines.append('  deepspeed "auto": ' + escape(resolved))
    for ref in plan["user_code"]:
        lines.append(f"  [yellow]runs user code[/] {escape(ref)}")
    return "\n".join(lines)


def _device(plan: dict[str, Any]) -> str:
    """What each worker trains on: ``cpu``, or ``cuda with N GPU``."""
    device = plan.get("device_per_worker", "cpu")
    if device == "cpu":
        return "cpu"
    return f"{device} with {_short(float(plan.get('gpus_per_worker', 0)))} GPU"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)
