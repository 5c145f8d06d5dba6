"""Resolve `package.module:function` references from recipes (this runs the user's own code)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from orchestrator.errors import UsageError


def resolve_factory(ref: str, key: str) -> Callable[..., Any]:
    """Import ``module:function``; a clear error names the recipe key when it cannot be found."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(
            f"{key}: cannot import module '{module_name}' ({exc}): install the package or "
            "run from the directory that holds it"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"{key}: '{module_name}' has no callable '{attr}'")
    return fn
