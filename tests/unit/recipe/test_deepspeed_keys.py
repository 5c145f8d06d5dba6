"""The hand-kept DeepSpeed key sets of the recipe layer agree with the installed DeepSpeed.

The recipe layer imports no DeepSpeed (validation stays fast and torch-free), so
:mod:`orchestrator.recipe.deepspeed` keeps the keys of every section it checks; these
tests fail when a DeepSpeed upgrade adds, renames or removes one. DeepSpeed is imported
only here.
"""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.recipe import deepspeed as ds

pytest.importorskip("deepspeed")


def _model_keys(model: Any) -> set[str]:
    """A DeepSpeed pydantic config model's field names and aliases."""
    keys = set(model.model_fields)
    return keys | {f.alias for f in model.model_fields.values() if f.alias}


class _Recording(dict):  # type: ignore[type-arg]
    """A config dict that records every key DeepSpeed looks up in it."""

    def __init__(self, data: dict[str, Any], seen: set[str]):
        super().__init__(data)
        self.seen = seen

    def get(self, key: Any, *default: Any) -> Any:
        self.seen.add(key)
        return super().get(key, *default)

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.seen.add(str(key))
        return super().__contains__(key)

    def keys(self) -> Any:
        recording = self

        class _Keys:
            def __contains__(self, key: object) -> bool:
                return key in recording

            def __iter__(self) -> Any:
                return iter(dict.keys(recording))

        return _Keys()


def _top_level_keys_read() -> set[str]:
    """Every top-level key DeepSpeedConfig reads while parsing a config."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()
    config = DeepSpeedConfig.__new__(DeepSpeedConfig)
    config._initialize_params(_Recording({"train_batch_size": 1}, seen))
    return seen


# Read by deepspeed.initialize itself, before DeepSpeedConfig (deepspeed/__init__.py).
READ_BY_INITIALIZE = {"sequence_parallel_size", "data_parallel_size"}


def test_top_level_keys_match_installed_deepspeed() -> None:
    assert _top_level_keys_read() | READ_BY_INITIALIZE == ds.TOP_KEYS


def test_removed_keys_are_not_accepted() -> None:
    import deepspeed.runtime.config as config

    assert not set(config._REMOVED_TOP_LEVEL_CONFIG_KEYS) & ds.TOP_KEYS
    assert not set(config._REMOVED_ZERO_CONFIG_KEYS) & ds.ZERO_KEYS


def test_nested_pydantic_sections_match_installed_deepspeed() -> None:
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )

    models = {
        "zero_optimization": DeepSpeedZeroConfig,
        "zero_optimization.offload_optimizer": DeepSpeedZeroOffloadOptimizerConfig,
        "zero_optimization.offload_param": DeepSpeedZeroOffloadParamConfig,
        "bf16": DeepSpeedBF16Config,
        "bfloat16": DeepSpeedBF16Config,
        "fp16": DeepSpeedFP16Config,
        "comms_logger": CommsLoggerConfig,
    }
    for section, model in models.items():
        assert _model_keys(model) == ds.SECTION_KEYS[section], section


def test_nested_reader_sections_match_installed_deepspeed() -> None:
    """Sections DeepSpeed reads key by key (not pydantic): record what it looks up."""
    from deepspeed.profiling.config import DeepSpeedFlopsProfilerConfig
    from deepspeed.runtime.activation_checkpointing.config import (
        DeepSpeedActivationCheckpointingConfig,
    )

    for section, reader in {
        "flops_profiler": DeepSpeedFlopsProfilerConfig,
        "activation_checkpointing": DeepSpeedActivationCheckpointingConfig,
    }.items():
        seen: set[str] = set()
        reader({section: _Recording({}, seen)})
        assert seen == ds.SECTION_KEYS[section], section


def test_every_checked_section_is_a_key_of_its_parent() -> None:
    for section in ds.SECTION_KEYS:
        if section:
            parent, _, name = section.rpartition(".")
            assert name in ds.SECTION_KEYS[parent], section


def test_auto_defaults_are_deepspeeds_defaults() -> None:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    by_name = {f.alias or n: f for n, f in DeepSpeedZeroConfig.model_fields.items()}
    by_name |= dict(DeepSpeedZeroConfig.model_fields)
    for key, value in ds.ZERO_AUTO_DEFAULTS.items():
        assert int(by_name[key].default) == value, key
