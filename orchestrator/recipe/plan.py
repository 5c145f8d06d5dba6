"""What `regimen plan` shows: each variant's schedule, without training."""

from __future__ import annotations

from typing import Any

from orchestrator.recipe.expand import Variant
from orchestrator.techniques.registry import config_of, registered


def plan_of(variant: Variant) -> dict[str, Any]:
    """A JSON-able description of one variant's run: batches, checkpoints, techniques, user code."""
    r = variant.recipe
    steps = r.schedule.steps
    every = r.checkpoint.every
    checkpoints = list(range(every, steps, every)) if every else []
    if r.checkpoint.at_end:
        checkpoints.append(steps)
    techniques: dict[str, Any] = {}
    for spec in registered():
        cfg = config_of(spec, r)
        if cfg is not None and cfg.enabled:
            techniques[spec.name] = spec.describe(cfg, r) if spec.describe else {}
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
        "zero_stage": r.zero_stage,
        "precision": r.precision,
        "checkpoints": checkpoints,
        "techniques": techniques,
        "user_code": user_code,
    }


def render_plan(plan: dict[str, Any]) -> str:
    """The plan as readable text for the terminal."""
    lines = [f"[bold]{plan['variant']}[/]"]
    if plan["assignments"]:
        lines.append("  sweep: " + ", ".join(f"{k}={v}" for k, v in plan["assignments"].items()))
    lines.append(
        f"  {plan['steps']} steps x {plan['global_batch_size']} samples "
        f"({plan['workers']} workers, ZeRO-{plan['zero_stage']}, {plan['precision']})"
    )
    cks = plan["checkpoints"]
    shown = ", ".join(map(str, cks[:6])) + (f", ... ({len(cks)} in all)" if len(cks) > 6 else "")
    lines.append(f"  checkpoints at: {shown or 'none'}")
    for name, info in plan["techniques"].items():
        lines.append(f"  {name}: " + ", ".join(f"{k}={_short(v)}" for k, v in info.items()))
    for ref in plan["user_code"]:
        lines.append(f"  [yellow]runs user code[/] {ref}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)
