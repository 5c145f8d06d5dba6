"""The package's layers point down only, and no package imports another in a cycle.

cli -> control -> audit -> cluster -> engine -> techniques -> data -> recipe / tracking ->
ground helpers (distributed, rundir, factories, envrefs) -> errors. Every import counts, including
the ones inside functions: a lazy import upward is still worker code reaching for driver
code.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from fresh_python import FreshPythons

PACKAGE = Path(__file__).resolve().parents[2] / "orchestrator"

# Higher ranks may import lower ones, never the other way round; equal ranks of different
# packages may not import each other either.
RANKS = {
    "cli": 70,
    "audit.cli": 70,
    "control": 60,
    "audit": 55,
    "cluster": 50,
    "engine": 40,
    "techniques": 30,
    "data": 25,
    "recipe": 20,
    "tracking": 20,
    "errors": 5,  # the one error hierarchy, under everything
    "distributed": 10,
    "rundir": 10,
    "screen": 65,  # the terminal: library log routing, closing lines (for cli; over rundir)
    "envrefs": 10,  # ${env:NAME} references: resolved by recipe, kept by tracking's redaction
    "factories": 10,
    "timeline": 10,  # wall-clock phase marks (driver and rank 0)
    "": 10,  # orchestrator/__init__.py
}
HEAVY = ("torch", "deepspeed", "ray", "mlflow", "transformers", "datasets")


def layer_of(module: str) -> str:
    """The layer name of a dotted module below ``orchestrator``: the longest RANKS prefix."""
    rest = module.removeprefix("orchestrator").lstrip(".")
    parts = rest.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANKS:
            return ".".join(parts[:n])
    return rest.split(".")[0]


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, relative ones resolved."""
    out = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((node.lineno, base))
    return out


def test_the_layer_map_names_every_package() -> None:
    """A new top-level package or module must be placed in a layer before it is used."""
    unplaced = {layer_of(m) for m in modules()} - set(RANKS)
    assert not unplaced, f"place these in RANKS (tests/unit/test_layers.py): {sorted(unplaced)}"


def test_every_import_points_down() -> None:
    upward = []
    for name, path in modules().items():
        here = layer_of(name)
        for line, target in imports_of(path, name):
            if not target.startswith("orchestrator"):
                continue
            there = layer_of(target)
            if there != here and RANKS[there] >= RANKS[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} -> {target}")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def test_no_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules().items():
        top = name.split(".")[1] if "." in name else ""
        for _, target in imports_of(path, name):
            if target.startswith("orchestrator."):
                other = target.split(".")[1]
                if other != top:
                    graph[top].add(other)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*trail, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*trail, node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            pytest.fail("package cycle: " + " -> ".join(cycle))


def test_the_recipe_layer_never_imports_heavy_libraries() -> None:
    heavy = []
    for name, path in modules().items():
        if layer_of(name) != "recipe":
            continue
        for line, target in imports_of(path, name):
            if target.split(".")[0] in HEAVY:
                heavy.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {target}")
    assert not heavy, "the recipe layer must stay light (no torch):\n" + "\n".join(heavy)


IMPORTED_ALONE = [
    ("orchestrator.recipe.loader", ("orchestrator.techniques", "orchestrator.engine", *HEAVY)),
    ("orchestrator.recipe.plan", ("orchestrator.techniques", "orchestrator.engine", "torch")),
    ("orchestrator.engine.loop", ("orchestrator.control", "orchestrator.cluster", "ray")),
    ("orchestrator.tracking.sink", ("orchestrator.engine", "orchestrator.control", "torch")),
]


@pytest.fixture(scope="module")
def imported_alone() -> Iterator[FreshPythons]:
    """For each IMPORTED_ALONE package, a fresh interpreter that imports just it and prints
    its sys.modules (all started at once)."""
    pythons = FreshPythons()
    for package, _ in IMPORTED_ALONE:
        code = f"import json, sys; import {package}; print(json.dumps(sorted(sys.modules)))"
        pythons.start(package, code)
    yield pythons
    pythons.close()


@pytest.mark.parametrize("package, forbidden", IMPORTED_ALONE)
def test_a_package_imported_alone_pulls_in_nothing_above_it(
    package: str, forbidden: tuple[str, ...], imported_alone: FreshPythons
) -> None:
    """Imported first, in a fresh interpreter: what it loads, not what its source says."""
    loaded = imported_alone.result(package)
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not bad, f"importing {package} alone loaded {bad[:12]}"
