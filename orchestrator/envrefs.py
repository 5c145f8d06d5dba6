"""Secrets in recipes: ``${env:NAME}`` references, resolved from the environment at load time.

A recipe never holds a secret's value. It holds a reference, ``${env:NAME}``, alone
(``token: ${env:HF_TOKEN}``) or inside a string (``uri: https://me:${env:MLFLOW_PW}@host``).
Every load (on the driver, and on each worker from the YAML text it received) resolves the
references from that process's environment; a variable that is not set is a problem at the
key's line. What is stored or shipped (MLflow's ``recipe.yaml``, params and tags, the YAML
the workers receive, a submitted job's ``recipe.yaml``) is the recipe with the references
put back (:func:`restore_refs`), never the values.

A ground helper: the recipe loader resolves references, tracking's redaction keeps them
(a reference hides nothing) and scrubs the values they resolved to, resume resolves them
again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")

_resolved_names: set[str] = set()  # every variable a reference resolved in this process


def is_reference(text: str) -> bool:
    """True when ``text`` is made of references only (it holds no value itself)."""
    return bool(ENV_REF.search(text)) and not ENV_REF.sub("", text).strip()


def _walk(data: Any, path: str, visit: Callable[[str, str], Any]) -> Any:
    """A copy of ``data`` with every string replaced by ``visit(dotted_key, string)``."""
    if isinstance(data, Mapping):
        return {k: _walk(v, f"{path}.{k}" if path else str(k), visit) for k, v in data.items()}
    if isinstance(data, list):
        return [_walk(v, f"{path}.{i}", visit) for i, v in enumerate(data)]
    if isinstance(data, str):
        return visit(path, data)
    return data


def references(data: Any) -> dict[str, str]:
    """``{dotted_key: written string}`` for every string of ``data`` that holds a reference."""
    found: dict[str, str] = {}

    def visit(key: str, text: str) -> str:
        if ENV_REF.search(text):
            found[key] = text
        return text

    _walk(data, "", visit)
    return found


Pinned = dict[str, tuple[str, str]]  # dotted key -> (written string, its resolved value)


def resolve_env_refs(
    data: Any,
    report: Callable[[str, str], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> Any:
    """A copy of ``data`` with every ``${env:NAME}`` replaced by the value of ``NAME``.

    A variable that is not set is reported as ``report(dotted_key, message)`` (the
    recipe loader's problem collector) and its reference left in place; without
    ``report`` it raises ``KeyError`` with that message.
    """
    return resolve_pinned(data, report, env)[0]


def resolve_pinned(
    data: Any,
    report: Callable[[str, str], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Any, Pinned]:
    """:func:`resolve_env_refs`, and ``{dotted_key: (written, resolved)}`` of each reference
    (what :func:`restore_refs` needs to write the references back)."""
    environ = os.environ if env is None else env
    pinned: Pinned = {}
    if not references(data):
        return data, pinned

    def visit(key: str, text: str) -> str:
        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                message = f"{match.group(0)} is not set: export {name}=... before running"
                if report is None:
                    raise KeyError(f"{key}: {message}")
                report(key, message)
                return match.group(0)
            _resolved_names.add(name)
            return environ[name]

        resolved = ENV_REF.sub(value, text)
        if resolved != text:
            pinned[key] = (text, resolved)
        return resolved

    return _walk(data, "", visit), pinned


def restore_refs(data: Any, pinned: Mapping[str, tuple[str, str]]) -> Any:
    """``data`` (resolved, e.g. a dumped Recipe) with each reference of ``pinned`` written
    back where the value is still the one it resolved to.

    A key whose value changed since (the driver made a path absolute) keeps its new value.
    """
    if not pinned:
        return data

    def visit(key: str, text: str) -> str:
        written, resolved = pinned.get(key, (None, None))
        return written if written is not None and text == resolved else text

    return _walk(data, "", visit)


def keys_holding(data: Any, marker: str) -> list[str]:
    """Dotted keys of ``data`` whose string value contains ``marker`` (e.g. a redaction mask)."""
    found: list[str] = []

    def visit(key: str, text: str) -> str:
        if marker in text:
            found.append(key)
        return text

    _walk(data, "", visit)
    return found


def resolved_values() -> list[str]:
    """The values of every variable a reference resolved in this process (to scrub from text)."""
    return [os.environ[n] for n in sorted(_resolved_names) if os.environ.get(n)]
