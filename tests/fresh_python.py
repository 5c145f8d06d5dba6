"""Code run in fresh interpreters, side by side: what a module imports is only seen in a
process that imported nothing before it, and the import-hygiene tests need several of them.

:class:`FreshPythons` starts them all at once (the machine's cores run them together, where
one after another would leave all but one idle) and hands each result to the test that
asks for it: the last stdout line, parsed as JSON.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import REPO


class FreshPythons:
    """Interpreters started by key; :meth:`result` waits for one and parses its output."""

    def __init__(self) -> None:
        self._procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, key: str, code: str, *args: str, cwd: Path = REPO) -> None:
        """Run ``python -c code *args`` in the background under ``key``."""
        self._procs[key] = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self, key: str, timeout: float = 120) -> Any:
        """The JSON of the last stdout line of ``key``'s interpreter, which must exit 0."""
        proc = self._procs[key]
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        """Stop the interpreters whose result nobody asked for (a test deselected)."""
        for proc in self._procs.values():
            if proc.returncode is None:  # its result was never read
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.communicate()


def run_fresh(code: str, *args: str, cwd: Path = REPO) -> Any:
    """One fresh interpreter, waited for: the JSON of its last stdout line."""
    pythons = FreshPythons()
    pythons.start("", code, *args, cwd=cwd)
    try:
        return pythons.result("")
    finally:
        pythons.close()
