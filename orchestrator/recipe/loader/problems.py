"""The problem collector every loading step reports into.

A :class:`Problems` maps each dotted key to the file and line that set it, so that a problem
found anywhere (YAML, `extends`, overrides, the schema, sweeps, technique checks) is reported
as ``FILE:LINE: dotted.key: message``; :meth:`Problems.error` raises them all at once.
"""

from __future__ import annotations

import re
from typing import Any

from orchestrator.errors import Problem, RecipeError

_KEY_CHARS = re.compile(r"[^\w.\-<>]")


class Problems:
    """Collects problems; resolves a dotted key to the file and line that set it."""

    def __init__(self, default_file: str):
        self.default_file = default_file
        self.lines: dict[str, tuple[str, int]] = {}
        self.items: list[Problem] = []

    def locate(self, key: str) -> tuple[str, int | None]:
        """File and line of ``key``, else of its nearest parent that has one, else unknown."""
        probe = key
        while probe:
            if probe in self.lines:
                return self.lines[probe]
            probe = probe.rpartition(".")[0]
        return self.default_file, None

    def add(self, key: str, message: str, file: str | None = None, line: int | None = None) -> None:
        """Record a problem at ``key``, located by ``file``/``line`` or else by :meth:`locate`."""
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


def short(value: Any) -> str:
    """A value, shortened for a one-line message."""
    from orchestrator.recipe.reference import short as shorten

    return shorten(value)
