"""Load a recipe: safe YAML with a line for every key, `extends`, overrides, and full validation.

Every problem found (YAML, schema, sweeps, DeepSpeed conflicts, technique checks) is
collected and raised together as one :class:`RecipeError`, each as
``FILE:LINE: dotted.key: what is wrong and how to fix it``.

Untrusted input is bounded before it is built: files over 1 MB, YAML that expands to
more than 100,000 values (anchor/alias bombs) or nests deeper than 64 levels, Python
object tags, non-UTF-8 bytes and `extends` chains that leave the recipe's directory
or the working directory are all reported as problems, never as tracebacks.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.errors import Problem, RecipeError
from orchestrator.recipe.dotted import deep_merge, get_dotted, set_dotted
from orchestrator.recipe.schema import Recipe

MAX_FILE_BYTES = 1_000_000
MAX_NODES = 100_000
MAX_DEPTH = 64
MAX_EXTENDS_DEPTH = 8
MAX_VARIANTS = 10_000
OVERRIDE_FILE = "<command line>"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"
_KEY_CHARS = re.compile(r"[^\w.\-<>]")
_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][\w\-]*(\.[\w\-]+)*$")


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (C speed when available) that also reads ``3e-3`` as a float (YAML 1.2)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


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
        key = _KEY_CHARS.sub("_", key)
        message = " ".join(message.split())  # one problem, one line
        self.items.append(Problem(file, line, key, message))

    def error(self) -> RecipeError:
        """Every problem once, ordered by file (first seen first) and line."""
        files: dict[str, int] = {}
        for p in self.items:
            files.setdefault(p.file, len(files))
        unique = list(dict.fromkeys(self.items))
        unique.sort(key=lambda p: (files[p.file], p.line is None, p.line or 0))
        return RecipeError(unique)


# ---------------------------------------------------------------------------------- YAML


def short(value: Any) -> str:
    """A value, shortened for a one-line message."""
    from orchestrator.recipe.reference import short as shorten

    return shorten(value)


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    """Line and message (with the fix) for a YAML error."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = text[: exc.position].count("\n") + 1 if isinstance(exc.position, int) else None
        char = (
            exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or " ")
        )
        return line, f"control character U+{char:04X} is not allowed in YAML: remove it"
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    what = str(getattr(exc, "problem", None) or str(exc).splitlines()[0])
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if "constructor for the tag" in what:
        tag = what.rpartition("tag ")[2].replace("tag:yaml.org,2002:", "!!")
        return line, f"YAML tag {tag} is not allowed (recipes are plain data): remove the tag"
    if "unhashable key" in what:
        return line, "a key is a list or mapping: keys must be plain names; rename it"
    if "nesting depth" in what:  # the YAML library's own limit, worded its own way
        return line, f"nested deeper than {MAX_DEPTH} levels: flatten the structure"
    if "undefined alias" in what:
        return line, "alias (*name) used before its anchor (&name): define the anchor first"
    if "another document" in what:
        return line, "more than one YAML document ('---'): keep a single document in the file"
    at = ""
    if mark is not None:
        lines = text.splitlines()
        if mark.line < len(lines) and mark.column < len(lines[mark.line]):
            at = lines[mark.line][mark.column]
    if at == "\t" or "'\\t'" in what:
        return line, "a tab character: indent YAML with spaces, not tabs"
    if context and context_mark is not None and context_mark.line + 1 != line:
        what = f"{what} ({context} started at line {context_mark.line + 1})"
    return line, f"YAML syntax error: {what}: fix the syntax here (indentation, colons, quotes)"


class _Walker:
    """Walks the composed YAML (aliases and merges included) before anything is built.

    Records the line of every dotted key, stops after ``MAX_NODES`` visits or ``MAX_DEPTH``
    levels (alias bombs, cycles, deep nesting), and reports duplicate keys and scalars that
    cannot be built (a 5,000-digit integer, a date with month 13) at their line.
    """

    def __init__(self, loader: Any, file: str, problems: _Problems):
        self.loader, self.file, self.problems = loader, file, problems
        self.lines: dict[str, tuple[str, int]] = {}
        self.budget = MAX_NODES
        self.found = 0
        self.too_deep = False

    def _problem(self, key: str, message: str, node: yaml.Node) -> None:
        self.problems.add(key, message, self.file, node.start_mark.line + 1)
        self.found += 1

    def walk(
        self, node: yaml.Node, path: str = "", depth: int = 0, merged: bool = False
    ) -> yaml.Node | None:
        """None when all is well, else the node where a limit was exceeded."""
        self.budget -= 1
        if self.budget < 0 or depth > MAX_DEPTH:
            self.too_deep = depth > MAX_DEPTH
            return node
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth, merged)
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                key = f"{path}.{i}"
                self.lines.setdefault(key, (self.file, item.start_mark.line + 1))
                if (bad := self.walk(item, key, depth + 1, merged)) is not None:
                    return bad
        elif node.tag != _STR_TAG:  # build scalars here (cached) to locate bad ones
            try:
                self.loader.construct_object(node)
            except yaml.YAMLError:
                raise
            except Exception as exc:  # (!!float abc, 5,000 digits, month 13)
                what = " ".join(str(exc).split())[:80]
                self._problem(
                    path,
                    f"{short(node.value)} cannot be read as {node.tag.rpartition(':')[2]} "
                    f"({what}): quote it if it is text, or give a valid value",
                    node,
                )
        return None

    def _mapping(
        self, node: yaml.MappingNode, path: str, depth: int, merged: bool
    ) -> yaml.Node | None:
        seen: dict[str, int] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                many = isinstance(value_node, yaml.SequenceNode)
                merges.extend(value_node.value if many else [value_node])
                continue
            name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "<complex key>"
            key = f"{path}.{name}" if path else name
            line = key_node.start_mark.line + 1
            if name in seen and not merged:
                self._problem(
                    key,
                    f"duplicate key '{name}' (also at line {seen[name]}): YAML keeps only the "
                    "last one; remove one of them",
                    key_node,
                )
            seen.setdefault(name, line)
            if merged:
                self.lines.setdefault(key, (self.file, line))
            else:
                self.lines[key] = (self.file, line)
            if (bad := self.walk(key_node, key, depth + 1, merged)) is not None:  # `!!int x:`
                return bad
            if (bad := self.walk(value_node, key, depth + 1, merged)) is not None:
                return bad
        for source in merges:  # `<<: *base`: keys written here win over merged ones
            if (bad := self.walk(source, path, depth + 1, merged=True)) is not None:
                return bad
        return None


def _too_deep(text: str) -> int | None:
    """Line of the first collection nested deeper than ``MAX_DEPTH``, else None.

    Reads the YAML event stream, which libyaml produces without recursion; composing
    nodes recurses in C, so 50,000 nested ``[`` (100 kB) would overflow the C stack and
    kill the process (SIGSEGV) before any Python limit applies. Syntax errors are left
    to the real parse.
    """
    opening, closing = (yaml.MappingStartEvent, yaml.SequenceStartEvent), (
        yaml.MappingEndEvent, yaml.SequenceEndEvent,
    )  # fmt: skip
    loader, depth = _Loader(text), 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, opening):
                depth += 1
                if depth > MAX_DEPTH:
                    mark = event.start_mark
                    return int(mark.line) + 1 if mark is not None else 1
            elif isinstance(event, closing):
                depth -= 1
    except yaml.YAMLError:
        # libyaml >= 0.2.6 stops at its own nesting limit (about 1,000 levels) while looking
        # ahead, before any event this walk could count. Count again on the pure-Python
        # scanner, which has no limit of its own, so the message does not depend on versions.
        return _too_deep_tokens(text)
    finally:
        loader.dispose()
    return None


def _too_deep_tokens(text: str) -> int | None:
    """Like :func:`_too_deep`, on tokens of the pure-Python scanner; stops past ``MAX_DEPTH``.

    Only the error path of :func:`_too_deep` comes here: the pure-Python scanner is slow on
    large files, but this returns as soon as the limit is passed. Syntax errors are left to
    the real parse.
    """
    opening = (
        yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken,
        yaml.BlockSequenceStartToken, yaml.BlockMappingStartToken,
    )  # fmt: skip
    closing = (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken, yaml.BlockEndToken)
    try:
        scanner, depth = yaml.SafeLoader(text), 0  # (its reader refuses control characters)
    except yaml.YAMLError:
        return None
    try:
        while scanner.check_token():
            token = scanner.get_token()
            if isinstance(token, opening):
                depth += 1
                if depth > MAX_DEPTH:
                    return int(token.start_mark.line) + 1
            elif isinstance(token, closing):
                depth -= 1
    except yaml.YAMLError:
        return None
    finally:
        scanner.dispose()
    return None


def _parse(
    text: str, file: str, problems: _Problems, *, recipe: bool = True
) -> tuple[Any, dict[str, tuple[str, int]]]:
    """Parse YAML safely: bounded and line-mapped; a recipe must be a mapping at the top.

    With ``recipe=False`` any single value is accepted (an override's value).
    """
    if (deep := _too_deep(text)) is not None:  # before composing: libyaml's composer recurses
        why = f"nested deeper than {MAX_DEPTH} levels: flatten the structure"
        problems.add("", why, file, deep)
        return None, {}
    loader = _Loader(text)
    walker = _Walker(loader, file, problems)
    try:
        root = loader.get_single_node()
        if root is None and recipe:
            problems.add("", "recipe is empty: start from recipes/quickstart.yaml", file, 1)
            return None, {}
        if root is None:
            return None, {}
        if recipe and not isinstance(root, yaml.MappingNode):
            kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
            problems.add(
                "",
                f"a recipe must be a mapping of sections, not {kind}: write `name: ...`, "
                "`schedule: ...` as top-level keys",
                file,
                root.start_mark.line + 1,
            )
            return None, {}
        bad = walker.walk(root)
        if bad is not None:
            why = (
                f"nested deeper than {MAX_DEPTH} levels (or an alias contains itself): "
                "flatten the structure"
                if walker.too_deep
                else f"expands to more than {MAX_NODES} values (YAML anchors/aliases multiply "
                "them): write the values out plainly, without aliases"
            )
            problems.add("", why, file, bad.start_mark.line + 1)
            return None, {}
        if walker.found:
            return None, {}
        data = loader.construct_document(root)
    except yaml.YAMLError as exc:
        line, message = _yaml_problem(exc, text)
        problems.add("", message, file, line)
        return None, {}
    except RecursionError:
        problems.add("", f"YAML nested too deeply (limit {MAX_DEPTH} levels): flatten it", file, 1)
        return None, {}
    finally:
        loader.dispose()
    return data, walker.lines


def _read_yaml(
    path: Path, problems: _Problems
) -> tuple[dict[str, Any] | None, dict[str, tuple[str, int]]]:
    """Read and parse one recipe file."""
    name = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        problems.add("", f"file not found: {name}: check the path", name, None)
        return None, {}
    except IsADirectoryError:
        problems.add("", f"{name} is a directory: give a recipe .yaml file", name, None)
        return None, {}
    except OSError as exc:
        problems.add("", f"cannot read {name} ({exc.strerror}): check its permissions", name, None)
        return None, {}
    if len(raw) > MAX_FILE_BYTES:
        problems.add(
            "",
            f"recipe is {len(raw)} bytes; the limit is {MAX_FILE_BYTES}: keep data out of the "
            "recipe (use data.paths or a factory)",
            name,
            1,
        )
        return None, {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        problems.add(
            "", f"byte {raw[exc.start]:#04x} is not valid UTF-8: save the file as UTF-8", name, line
        )
        return None, {}
    return _parse(text.removeprefix("\ufeff"), name, problems)


# ------------------------------------------------------------------------------- extends


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


def _resolve_extends(
    path: Path,
    problems: _Problems,
    roots: tuple[Path, ...],
    chain: tuple[Path, ...] = (),
) -> dict[str, Any] | None:
    """Read ``path`` and deep-merge it over the file it `extends`, recursively.

    Line numbers of the merged recipe go into ``problems.lines``: the child's win.
    """
    data, lines = _read_yaml(path, problems)
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
    target = (path.parent / parent).resolve()
    if not any(target.is_relative_to(root) for root in roots):
        problems.add(
            "extends",
            f"'{parent}' resolves to {target}, outside the recipe's directory and the working "
            "directory: copy the base recipe beside this one and use a relative path",
            *where,
        )
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
    if target.is_dir():
        problems.add("extends", f"'{parent}' is a directory: give a recipe file", *where)
        return None
    if not target.exists():
        problems.add(
            "extends",
            f"base recipe '{parent}' not found (looked for {target}): fix the path; it is "
            "relative to this file",
            *where,
        )
        return None
    base = _resolve_extends(target, problems, roots, chain)
    if base is None:
        return None
    problems.lines = {**_drop_replaced(problems.lines, data, lines), **lines}
    return deep_merge(base, data)


# ----------------------------------------------------------------------------- overrides


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
    probe = _Problems(OVERRIDE_FILE)
    parsed, _ = _parse(value, OVERRIDE_FILE, probe, recipe=False)
    if probe.items:
        if any("YAML" not in p.message for p in probe.items):  # a limit, not a syntax error
            raise ValueError(f"value of '{key}': {probe.items[0].message}")
        return key, value  # not YAML: keep the text as a string
    return key, parsed


def _apply_override(data: dict[str, Any], key: str, value: Any) -> None:
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


# ---------------------------------------------------------------------------- validation


def _non_finite(data: Any, path: str, out: list[str], budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        return
    if isinstance(data, float) and not math.isfinite(data):
        out.append(path)
    elif isinstance(data, dict):
        for k, v in data.items():
            _non_finite(v, f"{path}.{k}" if path else str(k), out, budget)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _non_finite(v, f"{path}.{i}", out, budget)


def _sweep_problems(data: dict[str, Any], problems: _Problems) -> bool:
    """Check the sweep lists (keys, emptiness, zip lengths) one key at a time."""
    from orchestrator.recipe.reference import key_problem

    sweep = data.get("sweep")
    if not isinstance(sweep, dict):
        return False
    found = False
    lengths: dict[str, int] = {}
    for section in ("grid", "zip"):
        lists = sweep.get(section)
        if not isinstance(lists, dict):
            continue
        for key, values in lists.items():
            where = f"sweep.{section}.{key}"
            why = None
            if not isinstance(key, str):
                why = f"key {key!r} must be a dotted recipe key such as optimizer.lr"
            elif key == "name" or key.split(".")[0] == "sweep":
                why = f"'{key}' cannot be swept (variant names come from the sweep): remove it"
            elif (problem := key_problem(key)) is not None:
                why = problem
            elif isinstance(values, list) and not values:
                why = f"the list for '{key}' is empty: give at least one value, or remove the key"
            elif section == "zip" and isinstance(values, list):
                lengths[key] = len(values)
            if section == "zip" and isinstance(sweep.get("grid"), dict) and key in sweep["grid"]:
                why = f"'{key}' is in both grid and zip: keep it in one of them"
            if why:
                problems.add(where, why)
                found = True
    grid = sweep.get("grid")
    sizes = [len(v) for v in grid.values() if isinstance(v, list)] if isinstance(grid, dict) else []
    count = math.prod(sizes)
    count *= max(lengths.values(), default=1)
    if count > MAX_VARIANTS:
        problems.add(
            "sweep",
            f"gives {count} variants; the limit is {MAX_VARIANTS}: use fewer values or "
            "split the sweep into several recipes",
        )
        found = True
    if len(set(lengths.values())) > 1:
        first, n = next(iter(lengths.items()))
        for key, m in lengths.items():
            if m != n:
                problems.add(
                    f"sweep.zip.{key}",
                    f"has {m} values but sweep.zip.{first} has {n}: give every zip list "
                    "the same length",
                )
        found = True
    return found


def _without(data: dict[str, Any], locs: list[tuple[Any, ...]]) -> dict[str, Any]:
    """A copy of ``data`` with the keys at ``locs`` removed."""
    trimmed = copy.deepcopy(data)
    for loc in locs:
        node: Any = trimmed
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return trimmed


def _cross_checks(recipe: Recipe, problems: _Problems) -> None:
    from orchestrator.engine.ds_config import ds_config_problems
    from orchestrator.techniques.registry import check_techniques

    for check in (ds_config_problems, check_techniques):
        try:
            found = check(recipe)
        except Exception as exc:
            problems.add(
                "",
                f"check {check.__name__} failed ({type(exc).__name__}: {exc}): this is a "
                "Regimen bug; please report it with this recipe",
            )
            continue
        for key, message in found:
            problems.add(key, message)


def validate_data(
    data: dict[str, Any], problems: _Problems, *, scan: dict[str, Any] | None = None
) -> Recipe | None:
    """Validate a plain dict into a Recipe, adding every problem found to ``problems``.

    ``scan`` limits the inf/nan scan to those dotted keys (a sweep variant: the rest of
    the recipe was scanned when it was loaded); by default the whole recipe is scanned.
    """
    from orchestrator.recipe.reference import explain, key_of

    swept = _sweep_problems(data, problems)
    bad_floats: list[str] = []
    for prefix, tree in ({"": data} if scan is None else scan).items():
        try:  # fast path in C; walk only when some float is inf/nan
            json.dumps(tree, allow_nan=False, skipkeys=True, default=str)
        except ValueError:
            _non_finite(tree, prefix, bad_floats, [MAX_NODES])
    for key in bad_floats:
        problems.add(key, "is not a finite number (inf/nan): give a plain number")
    reported = set(bad_floats)
    try:
        recipe: Recipe | None = Recipe.model_validate(data)
    except ValidationError as exc:
        recipe = None
        errors: list[dict[str, Any]] = [dict(e) for e in exc.errors()]
        for error in errors:
            loc: tuple[Any, ...] = tuple(error["loc"])
            if error["type"] == "missing" and loc and isinstance(loc[-1], int):
                loc = loc[:-1]  # a short tuple: say so at the tuple, not at the absent item
                error = {**error, "type": "too_short_tuple", "loc": loc}
            if swept and loc == ("sweep",) and error["type"] == "value_error":
                continue  # already said per key by _sweep_problems
            if key_of(loc) in reported:
                continue  # inf/nan, already said
            problems.add(key_of(loc), explain(error))
        if all(e["type"] in ("extra_forbidden", "invalid_key") for e in errors):
            # Unknown keys change nothing else: check the rest as if they were removed.
            trimmed = _without(data, [tuple(e["loc"]) for e in errors])
            with contextlib.suppress(ValidationError):
                _cross_checks(Recipe.model_validate(trimmed), problems)
    if recipe is not None:
        _cross_checks(recipe, problems)
    return None if problems.items else recipe


# ----------------------------------------------------------------------------- entry points


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRecipe:
    """Read, merge, override and validate a recipe; raise RecipeError listing every problem."""
    path = Path(path)
    problems = _Problems(str(path))
    roots = (path.parent.resolve(), Path.cwd().resolve())
    data = _resolve_extends(path, problems, roots)
    if data is None:
        raise problems.error()
    for i, text in enumerate(overrides, start=1):
        try:
            key, value = parse_override(text)
        except ValueError as exc:
            problems.add(text.partition("=")[0].strip() or "<override>", str(exc), OVERRIDE_FILE, i)
            continue
        _apply_override(data, key, value)
        problems.lines = {k: v for k, v in problems.lines.items() if not k.startswith(key + ".")}
        problems.lines[key] = (OVERRIDE_FILE, i)
    recipe = validate_data(data, problems)
    if recipe is None:
        raise problems.error()
    return LoadedRecipe(recipe=recipe, data=data, source=path, lines=problems.lines)


def load_recipe_text(text: str, name: str = "<recipe>") -> Recipe:
    """Validate recipe YAML held in memory (e.g. read back from MLflow)."""
    problems = _Problems(name)
    if len(text.encode("utf-8", "replace")) > MAX_FILE_BYTES:
        problems.add("", f"recipe is larger than {MAX_FILE_BYTES} bytes: shorten it", name, 1)
        raise problems.error()
    data, problems.lines = _parse(text, name, problems)
    recipe = validate_data(data, problems) if data is not None else None
    if recipe is None:
        raise problems.error()
    return recipe
