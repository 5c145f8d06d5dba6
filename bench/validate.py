"""Latency of `regimen validate` against interpreter start and `import torch`, side by side.

Three commands, each a fresh process of the same interpreter, run interleaved round
after round so that machine noise hits them alike:

* ``python -c pass``: interpreter start, the floor of any CLI call;
* ``python -c "import torch"``: what validating cost while the recipe layer imported torch;
* ``regimen validate recipes/quickstart.yaml``: the CLI (this tree's ``orchestrator``).

Prints each command's median wall time over ``--rounds``, its ratio to the
interpreter start and to ``import torch``, and one JSON line.

    python bench/validate.py [--rounds 9] [--recipe recipes/quickstart.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 0.5


def _regimen() -> list[str]:
    """The `regimen` script next to this interpreter, else the module."""
    script = shutil.which("regimen", path=str(Path(sys.executable).parent))
    return [sys.executable, script] if script else [sys.executable, "-m", "orchestrator.cli"]


def _time(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    """Run the rounds and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        f"regimen validate {args.recipe}": [*_regimen(), "validate", args.recipe],
    }
    for argv in commands.values():  # warm the page cache; not timed
        _time(argv, env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, argv in commands.items():
            times[name].append(_time(argv, env))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    start, torch_s = median["python -c pass"], median["python -c 'import torch'"]
    print(f"{'command':<45} {'median s':>9} {'x start':>8} {'x torch':>8}")
    for name, m in median.items():
        print(f"{name:<45} {m:>9.3f} {m / start:>8.1f} {m / torch_s:>8.2f}")
    validate = median[f"regimen validate {args.recipe}"]
    verdict = "met" if validate <= TARGET_S else "NOT met"
    print(f"target <= {TARGET_S} s: {verdict}")
    result = {
        "rounds": args.rounds,
        "median_s": {k: round(v, 4) for k, v in median.items()},
        "validate_over_start": round(validate / start, 2),
        "validate_over_import_torch": round(validate / torch_s, 3),
        "target_met": validate <= TARGET_S,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
