"""`extends`: a recipe deep-merged over the base recipe it names, recursively.

Chains that leave the recipe's directory or the working directory, cycles, more than
``MAX_EXTENDS_DEPTH`` levels and missing bases are problems at the `extends` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.recipe.dotted import deep_merge, get_dotted
from orchestrator.recipe.loader.problems import Problems, short
from orchestrator.recipe.loader.yaml_source import read_yaml

MAX_EXTENDS_DEPTH = 8


def contained_file(
    directory: Path, name: str, roots: tuple[Path, ...], what: str
) -> tuple[Path, str | None]:
    """``name`` resolved against ``directory`` (links followed), and why it cannot be read.

    The file must lie inside one of ``roots`` (the recipe's directory, the working
    directory), be a file and exist; the reason (None when all is well) names the fix.
    Used by `extends` and by `deepspeed: PATH`.
    """
    target = (directory / name).resolve()
    if not any(target.is_relative_to(root) for root in roots):
        return target, (
            f"'{name}' resolves to {target}, outside the recipe's directory and the working "
            f"directory: copy the {what} beside this recipe and use a relative path"
        )
    if target.is_dir():
        return target, f"'{name}' is a directory: give a {what} file"
    if not target.exists():
        return target, (
            f"{what} '{name}' not found (looked for {target}): fix the path; it is relative "
            "to the file that names it"
        )
    return target, None


def _drop_replaced(
    base_lines: dict[str, tuple[str, int]],
    child: dict[str, Any],
    child_lines: dict[str, tuple[str, int]],
) -> dict[str, tuple[str, int]]:
    """Base lines minus those under a key the child replaced with a non-mapping value."""
    replaced = {k for k in child_lines if not isinstance(get_dotted(child, k), dict)}
    kept = {}
    for key, where in base_lines.items():
        parts = key.split(".")
        if not any(".".join(parts[:i]) in replaced for i in range(1, len(parts))):
            kept[key] = where
    return kept


def resolve_extends(
    path: Path,
    problems: Problems,
    roots: tuple[Path, ...],
    chain: tuple[Path, ...] = (),
) -> dict[str, Any] | None:
    """Read ``path`` and deep-merge it over the file it `extends`, recursively.

    Line numbers of the merged recipe go into ``problems.lines``: the child's win.
    """
    data, lines = read_yaml(path, problems)
    if data is None:
        return None
    where = (str(path), lines.pop("extends", (str(path), None))[1])
    chain = (*chain, path.resolve())
    parent = data.pop("extends", None)
    if parent is None:
        problems.lines.update(lines)
        return data
    if not isinstance(parent, str) or not parent.strip():
        problems.add(
            "extends",
            f"must be one file path (got {short(parent)}): give one, e.g. `extends: base.yaml`",
            *where,
        )
        return None
    target, why = contained_file(path.parent, parent, roots, "base recipe")
    if why is not None and "outside" in why:
        problems.add("extends", why, *where)
        return None
    if target in chain:
        loop = " -> ".join(p.name for p in (*chain, target))
        problems.add(
            "extends", f"extends cycle {loop}: remove the `extends` that closes the loop", *where
        )
        return None
    if len(chain) > MAX_EXTENDS_DEPTH:
        problems.add(
            "extends",
            f"more than {MAX_EXTENDS_DEPTH} levels of `extends`: merge some base recipes",
            *where,
        )
        return None
    if why is not None:
        problems.add("extends", why, *where)
        return None
    base = resolve_extends(target, problems, roots, chain)
    if base is None:
        return None
    problems.lines = {**_drop_replaced(problems.lines, data, lines), **lines}
    return deep_merge(base, data)
