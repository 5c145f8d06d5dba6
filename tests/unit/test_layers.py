"""Layers point down: worker code never imports the driver, and neither do the audit tools.

The engine loads without control, cluster or cli, and no module of engine, techniques,
continual, tracking or audit imports them, even lazily inside a function."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "orchestrator"
DRIVER = ("orchestrator.control", "orchestrator.cluster", "orchestrator.cli")
AUDIT = ("orchestrator.audit",)
# package -> what none of its modules may import
FORBIDDEN = {
    "engine": DRIVER + AUDIT,
    "techniques": DRIVER + AUDIT,
    "continual": DRIVER + AUDIT,
    "tracking": DRIVER + AUDIT,
    "audit": DRIVER,
}
# tracking is a bottom layer: it may use itself and the ground-floor helpers only
GROUND = ("orchestrator.tracking", "orchestrator.errors", "orchestrator.distributed",
          "orchestrator.rundir")  # fmt: skip


def _is(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_submodule(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, at the top or inside functions: ``(line, module)``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "orchestrator":  # `from orchestrator import control`
                subs = [a.name for a in node.names if _is_submodule(a.name)]
                found += [(node.lineno, f"orchestrator.{name}") for name in subs]
    return found


def test_importing_the_engine_loads_no_driver_module() -> None:
    code = (
        "import json, sys\n"
        "import orchestrator.engine.loop, orchestrator.tracking.segments\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('orchestrator'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "orchestrator.engine.loop" in loaded and "orchestrator.tracking.segments" in loaded
    assert [m for m in loaded if _is(m, DRIVER)] == []


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_the_driver(package: str) -> None:
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in sorted((PACKAGE / package).rglob("*.py"))
        for line, module in _imports(path)
        if _is(module, FORBIDDEN[package])
    ]
    assert bad == []


def test_tracking_imports_only_itself_and_the_ground_floor() -> None:
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in sorted((PACKAGE / "tracking").rglob("*.py"))
        for line, module in _imports(path)
        if _is(module, ("orchestrator",)) and module != "orchestrator" and not _is(module, GROUND)
    ]
    assert bad == []
