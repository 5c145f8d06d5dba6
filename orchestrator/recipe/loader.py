"""Load a recipe: safe YAML with a line for every key, `extends`, overrides, and full validation.

Every problem found (YAML, schema, DeepSpeed conflicts, technique checks) is
collected and raised together as one :class:`RecipeError`, each as
``FILE:LINE: dotted.key: what is wrong and how to fix it``.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.errors import Problem, RecipeError
from orchestrator.recipe.dotted import deep_merge, set_dotted
from orchestrator.recipe.schema import Recipe

MAX_FILE_BYTES = 1_000_000
MAX_NODES = 100_000
MAX_DEPTH = 64
MAX_EXTENDS_DEPTH = 8
OVERRIDE_FILE = "<command line>"


@dataclass
class LoadedRecipe:
    """A validated recipe, the plain dict it came from, and where each key was written."""

    recipe: Recipe
    data: dict[str, Any]
    source: Path
    lines: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def yaml_text(self) -> str:
        """The resolved recipe (extends and overrides applied) as YAML."""
        return dump_recipe(self.recipe)

    @property
    def sha256(self) -> str:
        """Hash of the resolved recipe: identical regimes have identical hashes."""
        return hashlib.sha256(self.yaml_text.encode()).hexdigest()


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML with every default filled in (what actually runs)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


class _Problems:
    """Collects problems; resolves a dotted key to the file and line that set it."""

    def __init__(self, default_file: str):
        self.default_file = default_file
        self.lines: dict[str, tuple[str, int]] = {}
        self.items: list[Problem] = []

    def locate(self, key: str) -> tuple[str, int | None]:
        probe = key
        while probe:
            if probe in self.lines:
                return self.lines[probe]
            probe = probe.rpartition(".")[0]
        return self.default_file, None

    def add(self, key: str, message: str, file: str | None = None, line: int | None = None) -> None:
        if file is None:
            file, line = self.locate(key)
        self.items.append(Problem(file, line, key, message))


def _read_yaml(path: Path, problems: _Problems) -> dict[str, Any] | None:
    """Parse one file with the safe loader, recording the line of every dotted key."""
    name = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        problems.add("", f"file not found: {name}: check the path", name, None)
        return None
    except OSError as exc:
        problems.add("", f"cannot read {name}: {exc.strerror}", name, None)
        return None
    if len(raw) > MAX_FILE_BYTES:
        problems.add("", f"recipe is {len(raw)} bytes; the limit is {MAX_FILE_BYTES}", name, 1)
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        problems.add("", "file is not valid UTF-8: save it as UTF-8", name, line)
        return None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        problems.add("", f"YAML syntax error: {what}: fix the YAML at this line", name, line)
        return None
    except RecursionError:
        problems.add("", f"YAML nested too deeply (limit {MAX_DEPTH} levels)", name, 1)
        return None
    if data is None:
        problems.add("", "recipe is empty: start from recipes/quickstart.yaml", name, 1)
        return None
    if not isinstance(data, dict):
        problems.add("", "a recipe must be a mapping of sections (name:, model:, ...)", name, 1)
        return None
    budget = [MAX_NODES]
    if not _record_lines(root, "", name, problems.lines, budget, 0):
        problems.add(
            "",
            f"recipe expands to more than {MAX_NODES} values or {MAX_DEPTH} levels "
            "(YAML anchors/aliases or deep nesting): write it out plainly",
            name,
            1,
        )
        return None
    return data


def _record_lines(
    node: yaml.Node, path: str, file: str, out: dict[str, tuple[str, int]], budget: list[int], depth: int
) -> bool:
    """Walk the node tree (aliases included) within a node budget; False when it is exceeded."""
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        return False
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{path}.{key_node.value}" if path else str(key_node.value)
            out[key] = (file, key_node.start_mark.line + 1)
            if not _record_lines(value_node, key, file, out, budget, depth + 1):
                return False
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{path}.{i}"
            out.setdefault(key, (file, item.start_mark.line + 1))
            if not _record_lines(item, key, file, out, budget, depth + 1):
                return False
    return True


def _resolve_extends(
    path: Path, problems: _Problems, roots: tuple[Path, ...], depth: int = 0
) -> dict[str, Any] | None:
    """Read ``path`` and deep-merge it over the file it `extends`, recursively."""
    data = _read_yaml(path, problems)
    if data is None:
        return None
    parent = data.pop("extends", None)
    if parent is None:
        return data
    line = problems.lines.get("extends", (str(path), None))[1]
    if not isinstance(parent, str):
        problems.add("extends", "must be a file path string", str(path), line)
        return None
    if depth >= MAX_EXTENDS_DEPTH:
        problems.add("extends", f"more than {MAX_EXTENDS_DEPTH} levels (a cycle?)", str(path), line)
        return None
    target = (path.parent / parent).resolve()
    if not any(target.is_relative_to(root) for root in roots):
        problems.add(
            "extends",
            f"'{parent}' resolves outside the recipe's directory and the working directory: "
            "keep base recipes beside the recipe",
            str(path),
            line,
        )
        return None
    own_lines = dict(problems.lines)
    base = _resolve_extends(target, problems, roots, depth + 1)
    if base is None:
        return None
    problems.lines.update(own_lines)  # the child's lines win where it sets a key
    return deep_merge(base, data)


def parse_override(text: str) -> tuple[str, Any]:
    """``'optimizer.lr=3e-3'`` -> ``('optimizer.lr', 0.003)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override '{text}' must look like dotted.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str) and _FLOAT.match(parsed):
        parsed = float(parsed)  # YAML 1.1 reads '3e-3' as a string
    return key, parsed


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _fields_at(loc: tuple[str | int, ...]) -> list[str]:
    """Allowed keys of the section at ``loc`` (for did-you-mean)."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        candidates = getattr(annotation, "__args__", None) or (annotation,)
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    return list(model.model_fields) if model is not None else []


def _message(error: dict[str, Any]) -> str:
    kind, msg = error["type"], error["msg"]
    loc = tuple(error["loc"])
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f"did you mean '{guess[0]}'?" if guess else f"allowed keys: {', '.join(allowed)}"
        return f"unknown key: {hint}"
    if kind == "missing":
        return "required key is missing: add it (see docs/RECIPES.md)"
    msg = msg.removeprefix("Value error, ")
    if kind.startswith(("value_error", "assertion_error")):
        return msg
    return f"{msg} (got {error.get('input')!r})"


def _key_of(loc: tuple[Any, ...]) -> str:
    # Pydantic inserts union/function tags ('function-after[...]', 'WarmupConfig') into locs.
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p[:1].isupper()))]
    return ".".join(parts)


def validate_data(data: dict[str, Any], problems: _Problems) -> Recipe | None:
    """Validate a plain dict into a Recipe, adding every problem found to ``problems``."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            problems.add(_key_of(tuple(error["loc"])), _message(dict(error)))
        return None
    from orchestrator.engine.ds_config import ds_config_problems
    from orchestrator.techniques.registry import check_techniques

    for key, message in [*ds_config_problems(recipe), *check_techniques(recipe)]:
        problems.add(key, message)
    return None if problems.items else recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRecipe:
    """Read, merge, override and validate a recipe; raise RecipeError listing every problem."""
    path = Path(path)
    problems = _Problems(str(path))
    roots = (path.parent.resolve(), Path.cwd().resolve())
    data = _resolve_extends(path, problems, roots)
    if data is None:
        raise RecipeError(problems.items)
    for i, text in enumerate(overrides, start=1):
        try:
            key, value = parse_override(text)
        except ValueError as exc:
            problems.add(text, str(exc), OVERRIDE_FILE, i)
            continue
        set_dotted(data, key, value)
        problems.lines[key] = (OVERRIDE_FILE, i)
    recipe = validate_data(data, problems) if not problems.items else None
    if recipe is None:
        raise RecipeError(problems.items)
    return LoadedRecipe(recipe=recipe, data=data, source=path, lines=problems.lines)


def load_recipe_text(text: str, name: str = "<recipe>") -> Recipe:
    """Validate recipe YAML held in memory (e.g. read back from MLflow)."""
    problems = _Problems(name)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(name, None, "", f"YAML syntax error: {exc}")]) from None
    if not isinstance(data, dict):
        raise RecipeError([Problem(name, None, "", "a recipe must be a mapping")])
    recipe = validate_data(data, problems)
    if recipe is None:
        raise RecipeError(problems.items)
    return recipe
