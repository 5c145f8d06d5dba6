"""Command-line overrides: ``dotted.key=value`` with the value read as YAML."""

from __future__ import annotations

import re
from typing import Any

from orchestrator.recipe.dotted import set_dotted
from orchestrator.recipe.loader.problems import Problems
from orchestrator.recipe.loader.yaml_source import parse

OVERRIDE_FILE = "<command line>"
_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][\w\-]*(\.[\w\-]+)*$")


def parse_override(text: str) -> tuple[str, Any]:
    """``'optimizer.lr=3e-3'`` -> ``('optimizer.lr', 0.003)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not _OVERRIDE_KEY.match(key):
        raise ValueError(
            f"override '{text}' must look like dotted.key=value: write e.g. optimizer.lr=3e-4"
        )
    if key == "extends" or key.startswith("extends."):
        raise ValueError("`extends` cannot be overridden: set it in the recipe file")
    if not value.strip():
        return key, ""
    probe = Problems(OVERRIDE_FILE)
    parsed, _ = parse(value, OVERRIDE_FILE, probe, recipe=False)
    if probe.items:
        if any("YAML" not in p.message for p in probe.items):  # a limit, not a syntax error
            raise ValueError(f"value of '{key}': {probe.items[0].message}")
        return key, value  # not YAML: keep the text as a string
    return key, parsed


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key``; ``sweep.grid.<dotted.key>`` / ``sweep.zip.<dotted.key>`` keep their dots."""
    for section in ("sweep.grid.", "sweep.zip."):
        if key.startswith(section) and len(key) > len(section):
            sweep = data.get("sweep")
            if not isinstance(sweep, dict):
                sweep = data["sweep"] = {}
            name = section.split(".")[1]
            lists = sweep.get(name)
            if not isinstance(lists, dict):
                lists = sweep[name] = {}
            lists[key[len(section) :]] = value
            return
    set_dotted(data, key, value)


def apply_overrides(
    data: dict[str, Any], overrides: list[str] | tuple[str, ...], problems: Problems
) -> None:
    """Apply ``key=value`` overrides in order; bad ones become problems at their position.

    Each applied key is located at ``<command line>:N`` in ``problems.lines``, replacing the
    lines of whatever the key held before.
    """
    for i, text in enumerate(overrides, start=1):
        try:
            key, value = parse_override(text)
        except ValueError as exc:
            problems.add(text.partition("=")[0].strip() or "<override>", str(exc), OVERRIDE_FILE, i)
            continue
        apply_override(data, key, value)
        problems.lines = {k: v for k, v in problems.lines.items() if not k.startswith(key + ".")}
        problems.lines[key] = (OVERRIDE_FILE, i)
