"""The recipe layer is light and self-contained: no torch, no worker side, no import order.

The schema comes from the explicit catalog (orchestrator/recipe/catalog.py), so importing
the training side first changes nothing, and validating or planning a recipe never
imports torch, the techniques, the engine or the continual package.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fresh_python import FreshPythons, run_fresh

from orchestrator.recipe.catalog import CATALOG
from orchestrator.recipe.hf_models import default_layers, model_types
from orchestrator.recipe.schema import Recipe, TechniquesConfig

REPO = Path(__file__).resolve().parents[3]
# Validating sft_lisa.yaml loads its tokenizer (transformers) from the example model that
# examples/tiny_llama.py builds; tests/integration/test_sft_end_to_end.py validates it there.
NEEDS_THE_EXAMPLE_MODEL = {"sft_lisa.yaml"}
RECIPE_FILES = [
    p
    for p in sorted((REPO / "recipes").glob("*.yaml"))
    + sorted((REPO / "recipes" / "ci").glob("*.yaml"))
    if p.name not in NEEDS_THE_EXAMPLE_MODEL
]
# What the recipe layer must never pull in (modules, or packages and their submodules).
FORBIDDEN = (
    "torch",
    "deepspeed",
    "transformers",
    "ray",
    "mlflow",
    "orchestrator.techniques",
    "orchestrator.techniques.continual",
    "orchestrator.engine",
    "orchestrator.control",
    "orchestrator.cluster",
)
# The cli registers the cluster commands (light: no Ray until one runs), nothing heavier.
FORBIDDEN_IN_CLI = tuple(f for f in FORBIDDEN if f != "orchestrator.cluster")


def _loaded(forbidden: tuple[str, ...]) -> str:
    """Code that prints, as JSON, the loaded modules that are in ``forbidden``."""
    return f"""
import json, sys
bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in {forbidden!r}))
print(json.dumps(bad))
"""


def every_technique(tmp_path: Path) -> Path:
    """quickstart.yaml with every catalog entry's conformance example turned on."""
    data: dict[str, Any] = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    data["name"] = "every-technique"
    data["schedule"] = {"steps": 6, "micro_batch_size": 8}
    data["checkpoint"] = {"every": 2, "storage": str(tmp_path / "runs")}
    data["techniques"] = {}
    for entry in CATALOG:
        if entry.section == "techniques":
            data["techniques"][entry.name] = entry.example
        else:
            data[entry.section] = entry.example
    path = tmp_path / "every.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_technique_recipe_turns_every_technique_on(tmp_path: Path) -> None:
    from orchestrator.recipe.catalog import enabled
    from orchestrator.recipe.loader import load_recipe

    recipe = load_recipe(every_technique(tmp_path)).recipe
    assert [e.name for e, _ in enabled(recipe)] == [e.name for e in CATALOG]


TRAINING_SIDE = [
    "orchestrator.techniques.registry",
    "orchestrator.techniques.base",
    "orchestrator.techniques.continual.technique",
    "orchestrator.techniques.warmup",
]


@pytest.fixture(scope="module")
def training_side_first(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FreshPythons]:
    """For each TRAINING_SIDE module, a fresh interpreter that imports it first, then loads
    quickstart.yaml and the every-technique recipe (all started at once)."""
    every = str(every_technique(tmp_path_factory.mktemp("every")))
    pythons = FreshPythons()
    for first in TRAINING_SIDE:
        code = f"""
import json, sys
import {first}
from orchestrator.recipe.loader import load_recipe
from orchestrator.recipe.catalog import enabled
names = []
for path in sys.argv[1:]:
    names.append([e.name for e, _ in enabled(load_recipe(path).recipe)])
print(json.dumps(names))
"""
        pythons.start(first, code, str(REPO / "recipes" / "quickstart.yaml"), every)
    yield pythons
    pythons.close()


@pytest.mark.parametrize("first", TRAINING_SIDE)
def test_importing_the_training_side_first_changes_nothing(
    first: str, training_side_first: FreshPythons
) -> None:
    """The old schema came out empty when the technique catalog was imported first."""
    names = training_side_first.result(first)
    assert names == [["warmup"], [e.name for e in CATALOG]]


def test_recipe_modules_import_no_torch_and_no_worker_side() -> None:
    code = (
        "import pkgutil, importlib, orchestrator.recipe as pkg\n"
        "import orchestrator.recipe.loader, orchestrator.recipe.expand, orchestrator.recipe.plan\n"
        "for m in pkgutil.walk_packages(pkg.__path__, 'orchestrator.recipe.'):\n"
        "    importlib.import_module(m.name)\n" + _loaded(FORBIDDEN)
    )
    assert run_fresh(code) == []


def test_regimen_validate_and_plan_import_no_torch(tmp_path: Path) -> None:
    """`regimen validate` on every shipped recipe and on one using every technique, and
    `regimen plan` on the quickstart, in one fresh process: none loads torch."""
    code = (
        "import sys\n"
        "from orchestrator.cli import main\n"
        "codes = []\n"
        "for argv in [a.split('|') for a in sys.argv[1:]]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        codes.append(exc.code)\n"
        "assert codes == [0] * (len(sys.argv) - 1), codes\n" + _loaded(FORBIDDEN_IN_CLI)
    )
    files = [*RECIPE_FILES, every_technique(tmp_path)]
    argv = [f"validate|{p}" for p in files] + [f"plan|{REPO / 'recipes' / 'quickstart.yaml'}"]
    assert run_fresh(code, *argv) == []


def test_catalog_entries_are_the_schema_sections() -> None:
    """Each entry's config is the model at its key; techniques: has exactly the entries."""
    in_techniques = [e.name for e in CATALOG if e.section == "techniques"]
    assert list(TechniquesConfig.model_fields) == in_techniques
    for e in CATALOG:
        where = TechniquesConfig if e.section == "techniques" else Recipe
        annotation = where.model_fields[e.name if e.section == "techniques" else e.section]
        assert e.config in getattr(annotation.annotation, "__args__", ()), e.name
    assert [e.order for e in CATALOG] == sorted(e.order for e in CATALOG)


def test_lisa_default_layer_counts_are_transformers_defaults() -> None:
    """LISA's check knows each architecture's default depth without importing transformers
    (from the shipped table of config classes, orchestrator/recipe/hf_configs.json)."""
    transformers = pytest.importorskip("transformers")
    known = {a: default_layers(a) for a in model_types()}
    assert {"llama", "mistral", "qwen2", "gpt2"} <= {a for a, n in known.items() if n}
    for arch, layers in known.items():
        if layers is not None:
            assert transformers.AutoConfig.for_model(arch).num_hidden_layers == layers, arch
