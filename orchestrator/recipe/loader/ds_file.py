"""`deepspeed: PATH`: a DeepSpeed JSON (or YAML) config file inlined into the recipe.

The path is relative to the file that wrote it (the recipe, a base recipe it `extends`, or
the working directory for a command-line override) and may not leave the recipe's
directory or the working directory (the same rule as `extends`). JSON is YAML, so the file
is read by the same bounded safe loader, and each of its keys keeps its own line: a
problem inside it is reported as ``ds_config.json:LINE: deepspeed.key: ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.recipe.loader.extends import contained_file
from orchestrator.recipe.loader.overrides import OVERRIDE_FILE
from orchestrator.recipe.loader.problems import Problems
from orchestrator.recipe.loader.yaml_source import read_yaml


def inline_deepspeed_file(
    data: dict[str, Any], problems: Problems, roots: tuple[Path, ...]
) -> bool:
    """Replace a string `deepspeed:` by the mapping in the file it names; False on a problem."""
    name = data.get("deepspeed")
    if not isinstance(name, str):
        return True
    file, line = problems.locate("deepspeed")
    origin = Path.cwd() if file == OVERRIDE_FILE else Path(file).parent
    if not name.strip():
        problems.add("deepspeed", "is an empty path: give a DeepSpeed config file or a mapping")
        return False
    target, why = contained_file(origin, name, roots, "DeepSpeed config")
    if why is not None:
        problems.add("deepspeed", why, file, line)
        return False
    config, lines = read_yaml(target, problems, "DeepSpeed config")
    if config is None:
        return False
    data["deepspeed"] = config
    problems.lines.update({f"deepspeed.{key}": where for key, where in lines.items()})
    return True
