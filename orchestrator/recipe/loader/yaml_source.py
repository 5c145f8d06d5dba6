"""Safe, bounded, line-mapped YAML: the first step of loading a recipe.

Untrusted input is bounded before it is built: files over 1 MB, YAML that expands to more
than 100,000 values (anchor/alias bombs) or nests deeper than 64 levels, Python object tags
and non-UTF-8 bytes are all reported as problems, never as tracebacks. The walk over the
composed nodes records the line of every dotted key.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from orchestrator.recipe.loader.problems import Problems, short

MAX_FILE_BYTES = 1_000_000
MAX_NODES = 100_000
MAX_DEPTH = 64
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (C speed when available) that also reads ``3e-3`` as a float (YAML 1.2)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


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

    def __init__(self, loader: Any, file: str, problems: Problems):
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


def _past_max_depth(
    items: Iterator[Any], opening: tuple[type, ...], closing: tuple[type, ...]
) -> int | None:
    """Line of the first ``opening`` item nested deeper than ``MAX_DEPTH``, else None."""
    depth = 0
    for item in items:
        if isinstance(item, opening):
            depth += 1
            if depth > MAX_DEPTH:
                mark = getattr(item, "start_mark", None)
                return int(mark.line) + 1 if mark is not None else 1
        elif isinstance(item, closing):
            depth -= 1
    return None


def _too_deep(text: str) -> int | None:
    """Line of the first collection nested deeper than ``MAX_DEPTH``, else None.

    Reads the YAML event stream, which libyaml produces without recursion; composing
    nodes recurses in C, so 50,000 nested ``[`` (100 kB) would overflow the C stack and
    kill the process (SIGSEGV) before any Python limit applies. Syntax errors are left
    to the real parse.
    """
    opening = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
    closing = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
    loader = _Loader(text)
    try:
        return _past_max_depth(iter(loader.get_event, None), opening, closing)
    except yaml.YAMLError:
        # libyaml >= 0.2.6 stops at its own nesting limit (about 1,000 levels) while looking
        # ahead, before any event this walk could count. Count again on the pure-Python
        # scanner, which has no limit of its own, so the message does not depend on versions.
        return _too_deep_tokens(text)
    finally:
        loader.dispose()


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
        scanner = yaml.SafeLoader(text)  # (its reader refuses control characters)
    except yaml.YAMLError:
        return None
    try:
        return _past_max_depth(iter(scanner.get_token, None), opening, closing)
    except yaml.YAMLError:
        return None
    finally:
        scanner.dispose()


def parse(
    text: str, file: str, problems: Problems, *, recipe: bool = True, what: str = "recipe"
) -> tuple[Any, dict[str, tuple[str, int]]]:
    """Parse YAML safely: bounded and line-mapped; a recipe must be a mapping at the top.

    With ``recipe=False`` any single value is accepted (an override's value); ``what``
    names a mapping that is not a recipe (a DeepSpeed config file) in those two problems.
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
            empty = "start from recipes/quickstart.yaml" if what == "recipe" else "write its keys"
            problems.add("", f"{what} is empty: {empty}", file, 1)
            return None, {}
        if root is None:
            return None, {}
        if recipe and not isinstance(root, yaml.MappingNode):
            kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
            problems.add(
                "",
                f"a recipe must be a mapping of sections, not {kind}: write `name: ...`, "
                "`schedule: ...` as top-level keys"
                if what == "recipe"
                else f"a {what} must be a mapping of keys, not {kind}: write its keys at the "
                "top level",
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


def read_yaml(
    path: Path, problems: Problems, what: str = "recipe"
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
    return parse(text.removeprefix("\ufeff"), name, problems, what=what)
