"""Build the table of HF causal-LM config classes that the recipe layer checks `model.config` by.

The recipe layer must not import transformers (a config class import pulls in torch, ~1.5 s,
while `regimen validate` takes a quarter of that), so the keys and value types of every
config class of the installed transformers are written once into a JSON file shipped with
the package, ``orchestrator/recipe/hf_configs.json``; :mod:`orchestrator.recipe.hf_models`
reads it (and its :func:`~orchestrator.recipe.hf_models.check_config` is what the engine
applies to the live config class, with :func:`config_keys`, when it builds the model).
Regenerate it after upgrading transformers::

    python -m orchestrator.engine.hf_table > orchestrator/recipe/hf_configs.json

``tests/unit/engine/test_hf_table.py`` regenerates it and compares. Because the engine checks
the live class too, a model type the table does not know (another transformers version) is
still checked, without a file line.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from typing import Any

# Keys every config's __post_init__ accepts although they are not dataclass fields.
EXTRA_KEYS: dict[str, list[str]] = {
    "num_labels": ["int"],
    "output_attentions": ["bool"],
    "torch_dtype": ["str", "null"],
    "rope_theta": ["int", "float"],  # legacy RoPE keys, folded into rope_parameters
    "rope_scaling": ["dict", "null"],
    "partial_rotary_factor": ["int", "float"],
}
_SIMPLE = {int: "int", float: "float", bool: "bool", str: "str", list: "list", dict: "dict"}


def json_types(annotation: Any) -> list[str] | None:
    """The YAML value types an annotation accepts (int, float, bool, str, list, dict, null),
    sorted; None when it accepts anything or something YAML cannot write plainly."""
    if annotation is Any or annotation is object:
        return None
    if annotation is type(None) or annotation is None:
        return ["null"]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        found: set[str] = set()
        for arg in typing.get_args(annotation):
            sub = json_types(arg)
            if sub is None:
                return None
            found.update(sub)
        return sorted(found)
    if origin is typing.Literal:
        return sorted({_SIMPLE.get(type(v), "null") for v in typing.get_args(annotation)})
    if origin is typing.Annotated:
        return json_types(typing.get_args(annotation)[0])
    base = origin or annotation
    if base in _SIMPLE:
        return [_SIMPLE[base]]
    if base in (tuple, set, frozenset) or (
        isinstance(base, type) and issubclass(base, (list, tuple))
    ):
        return ["list"]
    if isinstance(base, type) and issubclass(base, dict):
        return ["dict"]
    return None  # a class (torch.dtype, a sub-config, ...): not checked here


def _resolve(cls: type, name: str, annotation: Any) -> Any:
    """A field's annotation, evaluated when it is a string (``from __future__ import
    annotations``) in the namespace of the class that declares it; Any when it cannot be."""
    if not isinstance(annotation, str):
        return annotation
    import torch

    for owner in cls.__mro__:
        if name in getattr(owner, "__annotations__", {}):
            namespace = {"torch": torch, **vars(sys.modules[owner.__module__])}
            try:
                return eval(annotation, namespace)
            except Exception:
                return Any
    return Any


def config_keys(cls: type) -> dict[str, list[str] | None]:
    """``{key: accepted types or None}`` of a transformers config class (its dataclass
    fields, its ``attribute_map`` aliases and the keys every config accepts)."""
    keys: dict[str, list[str] | None] = {}
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f.init and not f.name.startswith("_"):
                keys[f.name] = json_types(_resolve(cls, f.name, f.type))
    else:  # an old-style config: its __init__ parameters, types from the defaults
        import inspect

        for p in inspect.signature(cls).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                default = p.default
                keys[p.name] = (
                    None if default is None or default is p.empty else json_types(type(default))
                )
    for alias, target in getattr(cls, "attribute_map", {}).items():
        keys.setdefault(alias, keys.get(target))
    for key, accepted in EXTRA_KEYS.items():
        keys.setdefault(key, accepted)
    return dict(sorted(keys.items()))


def default_layers(cls: type) -> int | None:
    """The layer count of the config class's default instance, when it builds and has one."""
    try:
        layers = getattr(cls(), "num_hidden_layers", None)
    except Exception:  # a config that needs arguments
        return None
    return layers if isinstance(layers, int) and not isinstance(layers, bool) else None


def build_table() -> dict[str, Any]:
    """The table: the transformers version, the keys every config takes (``common``), and for
    every model type with a causal-LM class its config class name and its own keys;
    ``other_types`` lists the model types without one."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    common = config_keys(transformers.PretrainedConfig)
    causal: dict[str, Any] = {}
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            cls = CONFIG_MAPPING[model_type]
        except (KeyError, ImportError, AttributeError):
            continue
        own = {k: v for k, v in config_keys(cls).items() if k not in common or common[k] != v}
        causal[model_type] = {"class": cls.__name__, "keys": own}
        if (layers := default_layers(cls)) is not None:
            causal[model_type]["layers"] = layers
    return {
        "transformers": transformers.__version__,
        "common": common,
        "causal_lm": causal,
        "other_types": sorted(set(CONFIG_MAPPING_NAMES) - set(causal)),
    }


def table_json() -> str:
    """The table as the JSON text that is shipped (stable key order, one line per entry)."""
    table = build_table()
    lines = [
        "{",
        f'  "transformers": {json.dumps(table["transformers"])},',
        f'  "common": {json.dumps(table["common"], sort_keys=True)},',
        f'  "other_types": {json.dumps(table["other_types"])},',
        '  "causal_lm": {',
    ]
    entries = [
        f"    {json.dumps(mt)}: {json.dumps(entry, sort_keys=True)}"
        for mt, entry in table["causal_lm"].items()
    ]
    lines += [",\n".join(entries), "  }", "}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table_json())
