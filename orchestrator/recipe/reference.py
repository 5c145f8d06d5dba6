"""The recipe schema in words: docs/RECIPES.md and the wording of validation problems.

``render_markdown()`` generates docs/RECIPES.md from :class:`Recipe` (its JSON schema
and ``model_fields``), techniques included since they come from the catalog::

    python -m orchestrator.recipe.reference > docs/RECIPES.md

The same walk over the schema gives the loader its "did you mean" suggestions, the
check of sweep keys, and :func:`explain`, which turns a pydantic error into one line
that says what is wrong and how to fix it.
"""

from __future__ import annotations

import difflib
import json
import re
import reprlib
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from orchestrator.recipe.schema import Recipe

# ---------------------------------------------------------------------------- the schema


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``X``, ``X | None``), if any."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def field_at(loc: tuple[Any, ...]) -> FieldInfo | None:
    """The schema field at ``loc`` (a pydantic location), or None past a free-form dict."""
    model: type[BaseModel] | None = Recipe
    info = None
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = model_in(info.annotation)
    return info


def fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Allowed keys of the section at ``loc`` (for did-you-mean)."""
    if not loc:
        return list(Recipe.model_fields)
    info = field_at(loc)
    model = model_in(info.annotation) if info is not None else None
    return list(model.model_fields) if model is not None else []


def all_paths(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key the schema knows (free-form dicts stop the walk)."""
    paths = []
    for name, info in model.model_fields.items():
        paths.append(prefix + name)
        sub = model_in(info.annotation)
        if sub is not None:
            paths.extend(all_paths(sub, f"{prefix}{name}."))
    return paths


def _free_form(info: FieldInfo) -> bool:
    """A ``dict[...]`` field (model.config, deepspeed, ...): any key below it is allowed."""
    return info.annotation is dict or get_origin(info.annotation) is dict


def key_problem(dotted: str) -> str | None:
    """Why ``dotted`` is not a settable recipe key (with the fix), or None when it is."""
    model: type[BaseModel] | None = Recipe
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if model is None:
            return None
        if part not in model.model_fields:
            where = ".".join(parts[:i])
            guess = difflib.get_close_matches(part, list(model.model_fields), n=1, cutoff=0.6)
            hint = (
                f"did you mean '{'.'.join([*parts[:i], guess[0]])}'?"
                if guess
                else (f"use one of: {', '.join(model.model_fields)}")
            )
            return (
                f"'{dotted}' is not a recipe key ({where or 'top level'} has no '{part}'): {hint}"
            )
        info = model.model_fields[part]
        model = model_in(info.annotation)
        rest = parts[i + 1 :]
        if model is None and rest:
            if _free_form(info) or all(p.isdigit() for p in rest):
                return None
            return (
                f"'{'.'.join(parts[: i + 1])}' is a value, not a section: "
                f"remove '.{'.'.join(rest)}'"
            )
    return None


# ------------------------------------------------------------------- validation messages

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 50
_repr.maxlist = _repr.maxdict = _repr.maxtuple = 4
_repr.maxlevel = 2


def short(value: Any) -> str:
    return _repr.repr(value)


def did_you_mean(word: str, choices: list[str]) -> str:
    guess = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not guess:
        lowered = {c.lower(): c for c in choices}
        guess = [lowered[word.lower()]] if word.lower() in lowered else []
    return f"did you mean '{guess[0]}'?" if guess else ""


def _unknown_key(loc: tuple[Any, ...]) -> str:
    name = str(loc[-1])
    allowed = fields_at(loc[:-1])
    hint = did_you_mean(name, allowed)
    if not hint:
        elsewhere = [p for p in all_paths() if p.rsplit(".", 1)[-1] == name]
        if elsewhere:
            hint = f"did you mean '{elsewhere[0]}'? (move it there)"
    if not hint:
        hint = f"remove it (allowed here: {', '.join(allowed)})" if allowed else "remove it"
    return f"unknown key '{name}': {hint}"


_KINDS = {
    ("int_type", "int_parsing", "int_from_float", "int_parsing_size"): (
        "a whole number",
        "write digits only, e.g. 100",
    ),
    ("float_type", "float_parsing"): ("a number", "write e.g. 0.001 or 3e-4"),
    ("bool_type", "bool_parsing"): ("true or false", "use true or false"),
    ("string_type",): ("text", "quote it"),
    ("list_type", "tuple_type"): ("a list", "write it as [a, b] or as '- item' lines"),
}


def explain(error: dict[str, Any]) -> str:
    """A pydantic error as one line that says what is wrong and how to fix it."""
    kind, msg = error["type"], error["msg"]
    loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    got = short(error.get("input"))
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "invalid_key" or (loc and loc[-1] == "[key]"):
        return f'key {got} is not text: quote the key, e.g. "{error.get("input")}":'
    if kind == "missing":
        leaf = loc[-1] if loc else ""
        info = field_at(loc)
        about = f" ({info.description})" if info is not None and info.description else ""
        parent = ".".join(str(p) for p in loc[:-1])
        under = f" under `{parent}:`" if parent else ""
        return f"required key '{leaf}' is missing: add it{under}{about}"
    if kind == "too_short_tuple":
        info = field_at(loc)
        example = f", e.g. {list(info.default)}" if info is not None and info.default else ""
        return f"has too few values (got {got}): give all of them{example}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = did_you_mean(str(error.get("input")), choices)
        return f"{got} is not allowed: use one of {ctx.get('expected')}" + (
            f"; {hint}" if hint else ""
        )
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if error.get("input") is None:
            return "is empty: give its keys (indented below it) or remove the line"
        return f"must be a mapping of keys (got {got}): write `key: value` lines indented below it"
    for kinds, (what, fix) in _KINDS.items():
        if kind in kinds:
            return f"must be {what}, got {got}: {fix}"
    bounds = {
        "greater_than": ("greater than", "gt", "raise it"),
        "greater_than_equal": ("at least", "ge", "raise it"),
        "less_than": ("less than", "lt", "lower it"),
        "less_than_equal": ("at most", "le", "lower it"),
    }
    if kind in bounds:
        words, name, fix = bounds[kind]
        return f"must be {words} {ctx.get(name)}, got {got}: {fix}"
    if kind == "string_pattern_mismatch":
        return (
            f"{got} has characters that are not allowed: use letters, digits, '_', '.', '-' "
            f"(starting with a letter or digit; pattern {ctx.get('pattern')})"
        )
    if kind == "string_too_long":
        size = len(error.get("input") or "")
        return f"is {size} characters long; the limit is {ctx.get('max_length')}: shorten it"
    if kind == "too_long":
        return (
            f"has {ctx.get('actual_length')} values (got {got}); at most "
            f"{ctx.get('max_length')} are allowed: remove the extra ones"
        )
    if kind in ("string_too_short", "too_short"):
        return f"{msg.rstrip('.')} (got {got}): add what is missing"
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind.startswith(("value_error", "assertion_error")):
        return msg
    return f"{msg} (got {got}): change the value"


def key_of(loc: tuple[Any, ...]) -> str:
    """Dotted key of a pydantic location, without pydantic's own tags ('[key]', 'function-...')."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and p.startswith(("[", "function-")))]
    return ".".join(parts)


# ---------------------------------------------------------------------------- docs

_INTRO = """\
<!-- Generated by orchestrator/recipe/reference.py from the recipe schema: do not edit.
     Regenerate with: python -m orchestrator.recipe.reference > docs/RECIPES.md -->

# Recipe reference

A recipe is one YAML file describing a whole training regime. `regimen validate RECIPE`
checks it (every sweep variant included) and `regimen schema` prints the JSON Schema
for editor completion. Every key of every section is listed below with its type,
default, constraints and meaning; unknown keys are errors at every level.

## Writing recipes

- **Sections.** Top-level keys are sections (`model:`, `optimizer:`, `schedule:` ...).
  Only `name` and `schedule.steps` are required; everything else has a default.
- **`extends: base.yaml`** deep-merges this file over another recipe (the path is
  relative to this file and must stay inside its directory or the working directory).
  Mappings merge key by key; lists and values from the child replace the base's.
  Chains of up to 8 files work; cycles are errors.
- **Overrides** on the command line: `regimen run recipe.yaml optimizer.lr=3e-4
  schedule.steps=1000 optimizer.betas=[0.9,0.99]`. Values are YAML (`3e-4` is a
  number); problems in them are reported as `<command line>:N` (the N-th override).
  `sweep.grid.optimizer.lr=[1e-3,3e-3]` sets one sweep list (the dotted key is kept).
- **Sweeps.** `sweep.grid` maps dotted keys to lists and runs their cross product;
  `sweep.zip` maps dotted keys to lists of one common length advanced together; both
  together give grid x zip variants (at most 10,000). Each variant is validated as a
  whole recipe and named after its values, e.g. `quickstart-lr_0.003-seed_1`.
- **Safety limits.** Plain YAML only (tags such as `!!python/object` are rejected),
  UTF-8, at most 1 MB per file, 100,000 values and 64 levels of nesting (anchor and
  alias bombs stop there), no duplicate keys, no `inf`/`nan` numbers.
- **Secrets: `${env:NAME}`.** Write a secret as a reference to an environment variable,
  alone (`tracking.tags.token: ${env:MY_TOKEN}`) or inside a string
  (`tracking.uri: https://me:${env:MLFLOW_PW}@mlflow.example`). Every load resolves it from
  that process's environment: the driver's (`regimen run`, `resume`, `rollback`, `submit`)
  and each Ray worker's, which validates the recipe text it received. An unset variable is
  an error at its line (`${env:MY_TOKEN} is not set: export MY_TOKEN=... before running`).
  What MLflow stores (the `recipe.yaml` artifact, params, tags), the recipe text the
  workers and a submitted job receive, and the logs hold the reference, never the value;
  `regimen resume` resolves it again from the environment. Regimen never ships the value:
  a local Ray's workers inherit the driver's environment, a cluster's nodes must have the
  variable set themselves. A secret written in the clear is stored as `***`, and resuming
  such a run stops with an error naming the key: write it as `${env:NAME}` and run again.

## DeepSpeed settings

`deepspeed:` holds native DeepSpeed config keys, merged under what Regimen derives from
the recipe. Every key at every level Regimen checks (the top level, `zero_optimization`
with `offload_optimizer` / `offload_param`, `bf16`, `fp16`, `activation_checkpointing`,
`flops_profiler`, `comms_logger`, `optimizer`) must be one DeepSpeed accepts: a typo such
as `zreo_optimization:` is an error with a did-you-mean, never a silent ZeRO-0 run.
ZeRO stages 0, 1, 2 and 3 are supported. Under ZeRO-3 warmup, dropout, the spike guard
(skips, rollbacks, stop), continual learning, SGG, checkpoints and resume work as at the
other stages (the gradient norm is DeepSpeed's global norm of the step; the partitioned
checkpoint is gathered with DeepSpeed's `zero_to_fp32`). Two things are refused at
validation with the reason: `techniques.lisa` (each layer switch rebuilds the engine, and
ZeRO-3 would re-partition parameters that are already partitioned: use stage 2, where
LISA keeps optimizer state only for the active layers) and `stability.indicators_every`
(the indicators read whole embedding rows and per-parameter optimizer slices, which ZeRO-3
partitions away).

- **`deepspeed: ds_config.json`** (or `.yaml`) reads the config from a file, relative to
  the file that names it; like `extends`, it must stay inside the recipe's directory or the
  working directory. Problems inside it are reported at its own lines
  (`ds_config.json:4: deepspeed.zero_optimization.reduce_bucket_sise: ...`). A config
  pasted inline works too: JSON is YAML.
- **`"auto"`**, as in HF Trainer / Accelerate / Axolotl configs, means what the recipe
  says: `train_batch_size`, `train_micro_batch_size_per_gpu`, `gradient_accumulation_steps`
  (from `schedule:` and `resources.workers`), `gradient_clipping` (`optimizer.grad_clip`),
  `bf16.enabled` / `fp16.enabled` (`precision`), and the `optimizer.params` `lr`, `betas`,
  `eps`, `weight_decay`, `momentum` (`optimizer:`). For ZeRO sizes (`reduce_bucket_size`,
  `allgather_bucket_size`, `stage3_prefetch_bucket_size`,
  `stage3_param_persistence_threshold`, ...) it means DeepSpeed's default. `"auto"`
  anywhere else is an error. `regimen plan` shows every `"auto"` resolved
  (`plan --json` gives the whole DeepSpeed config under `deepspeed`).
- **Regimen owns** batch sizes, clipping, precision and the optimizer. A value that
  disagrees with the recipe is an error naming both values and the fix. An `optimizer:`
  block is accepted when its `type` and each param are `"auto"` or agree with the
  recipe's `optimizer:` section (Regimen then builds that optimizer itself); a
  `scheduler:` block is refused (the LR schedule is `techniques.warmup`).
- `recipes/hf_style_zero2.yaml` (by path, `recipes/ds/zero2_auto.json`) and
  `recipes/hf_style_zero1.yaml` (inline) are such configs, used as they are.

## Errors

Every problem is reported at once, one a line, on stderr, and `regimen` exits with 2:

```
FILE:LINE: dotted.key: what is wrong and how to fix it
recipes/mine.yaml:27: optimizer.lrr: unknown key 'lrr': did you mean 'lr'?
recipes/mine.yaml:40: techniques.warmup.min_lr: min_lr 0.01 is above optimizer.lr 0.003: set ...
<command line>:1: schedule.steps: must be greater than 0, got 0: raise it
```

`LINE` is `?` where no line applies (a missing file). A problem caused by one swept
value points at that value in `sweep:` and names the variants it breaks.
"""


def _type_of(prop: dict[str, Any]) -> str:
    """A JSON-schema property as a short human type."""
    if "$ref" in prop:
        return "section"
    if "anyOf" in prop:
        kinds = [_type_of(p) for p in prop["anyOf"] if p.get("type") != "null"]
        nullable = any(p.get("type") == "null" for p in prop["anyOf"])
        return " or ".join(kinds) + (" or null" if nullable else "")
    if "enum" in prop:
        return "one of " + ", ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    kind = prop.get("type")
    if kind == "array":
        if "prefixItems" in prop:
            items = [_type_of(p) for p in prop["prefixItems"]]
            return f"list of {len(items)} " + ("numbers" if set(items) == {"number"} else "values")
        inner = _type_of(prop.get("items") or {})
        return f"list of {inner}" if inner != "any" else "list"
    if kind == "object":
        extra = prop.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            return f"mapping of name to {_type_of(extra)}"
        return "mapping"
    return {"integer": "integer", "number": "number", "string": "string", "boolean": "boolean"}.get(
        str(kind), "any"
    )


def _constraints(prop: dict[str, Any]) -> str:
    for option in prop.get("anyOf", []):
        if option.get("type") != "null":
            prop = {**option, **prop}
    words = []
    for key, fmt in (
        ("exclusiveMinimum", "> {}"),
        ("minimum", ">= {}"),
        ("exclusiveMaximum", "< {}"),
        ("maximum", "<= {}"),
        ("minLength", "at least {} characters"),
        ("maxLength", "at most {} characters"),
        ("pattern", "matches `{}`"),
    ):
        if key in prop:
            words.append(fmt.format(prop[key]))
    return ", ".join(words)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "see below"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{json.dumps(value, default=str)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _section(model: type[BaseModel], path: str, defs: dict[str, Any], out: list[str]) -> None:
    """One table for ``model``'s keys, then a table per nested section."""
    schema = defs.get(model.__name__, {}) if path else Recipe.model_json_schema()
    props = schema.get("properties", {})
    doc = " ".join((model.__doc__ or "").split()) if path else ""
    nested: list[tuple[str, type[BaseModel]]] = []
    rows = []
    for name, info in model.model_fields.items():
        prop = props.get(name, {})
        sub = model_in(info.annotation)
        key = f"{path}.{name}" if path else name
        if sub is not None:
            nested.append((key, sub))
        link = f"section ([`{key}`](#{key.replace('.', '')}))"
        kind = link if sub is not None else _type_of(prop)
        if sub is not None and "null" in _type_of(prop):
            kind += " or null"
        about = info.description or ""
        rows.append(
            f"| `{name}` | {_cell(kind)} | {_cell(_default(info))} | "
            f"{_cell(_constraints(prop))} | {_cell(about)} |"
        )
    out.append(f"### `{path}`\n" if path else "### Top level\n")
    if doc:
        out.append(doc + "\n")
    if path == "techniques":
        out.append(
            "Each technique is off unless its section is present; `enabled: false` turns a "
            "present one off. Run order is fixed (the catalog's order), the same on every rank.\n"
        )
    out.append("| key | type | default | constraints | description |")
    out.append("|---|---|---|---|---|")
    out.extend(rows)
    out.append("")
    for key, sub in nested:
        _section(sub, key, defs, out)


def render_markdown() -> str:
    """docs/RECIPES.md: every key of every section, generated from the schema."""
    defs = Recipe.model_json_schema().get("$defs", {})
    out = [_INTRO, "## Keys\n"]
    _section(Recipe, "", defs, out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
