"""The recipe schema: :class:`Recipe`, made of small typed sections that forbid unknown keys.

A recipe is plain YAML validated into :class:`Recipe`. The core sections are in
:mod:`orchestrator.recipe.sections`; the technique sections come from the explicit
catalog (:mod:`orchestrator.recipe.catalog`): ``techniques:`` has one optional field
per catalog entry of section ``techniques``, and the top-level ``stability:`` and
``continual:`` are catalog entries too. Nothing here imports torch or the worker side.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, create_model

from orchestrator.recipe.catalog import CATALOG
from orchestrator.recipe.sections import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    NonNegativeInt,
    OptimizerConfig,
    PositiveInt,
    ResourcesConfig,
    ScheduleConfig,
    Section,
    SweepConfig,
    TechniqueConfig,
    TrackingConfig,
)
from orchestrator.recipe.techniques.continual import (
    ContinualConfig,
    ContinualEvalConfig,
    ReplayConfig,
    StageConfig,
)
from orchestrator.recipe.techniques.stability import StabilityConfig

__all__ = [
    "CheckpointConfig",
    "ContinualConfig",
    "ContinualEvalConfig",
    "DataConfig",
    "ModelConfig",
    "NonNegativeInt",
    "OptimizerConfig",
    "PositiveInt",
    "Recipe",
    "ReplayConfig",
    "ResourcesConfig",
    "ScheduleConfig",
    "Section",
    "StabilityConfig",
    "StageConfig",
    "SweepConfig",
    "TechniqueConfig",
    "TechniquesConfig",
    "TrackingConfig",
]


def _techniques_model() -> type[Section]:
    """The `techniques:` section: one optional field per catalog entry, in run order."""
    fields: dict[str, Any] = {
        e.name: (e.config | None, Field(None, description=e.summary))
        for e in CATALOG
        if e.section == "techniques"
    }
    return create_model("TechniquesConfig", __base__=Section, **fields)


TechniquesConfig = _techniques_model()


def _file_keys(schema: dict[str, Any]) -> None:
    """What a recipe *file* may say beyond the model: `extends`, and `deepspeed: PATH`.

    The loader resolves both before validation (the model never sees them), but editors
    validate the file itself against `regimen schema`.
    """
    props = schema.setdefault("properties", {})
    props["extends"] = {
        "type": "string",
        "title": "Extends",
        "description": "A base recipe (path relative to this file, inside its directory or "
        "the working directory) that this recipe is deep-merged over.",
    }
    ds = props.get("deepspeed", {})
    props["deepspeed"] = {
        "title": ds.get("title", "Deepspeed"),
        "description": ds.get("description", ""),
        "default": ds.get("default", {}),
        "anyOf": [
            {"type": "object", "additionalProperties": True},
            {
                "type": "string",
                "description": "A DeepSpeed JSON or YAML config file, relative to this recipe.",
            },
        ],
    }


class Recipe(Section):
    """A whole training regime. Load one with :func:`orchestrator.recipe.load_recipe`."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_file_keys)

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=100)
    description: str = ""
    seed: NonNegativeInt = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    techniques: TechniquesConfig = Field(default_factory=TechniquesConfig)  # type: ignore[valid-type]
    stability: StabilityConfig | None = None
    continual: ContinualConfig | None = None
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="Native DeepSpeed config keys (inline, or the path of a JSON/YAML file), "
        'merged with what Regimen derives; "auto" means what the recipe says.',
    )
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig | None = None

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step across all workers."""
        s = self.schedule
        return s.micro_batch_size * s.grad_accumulation * self.resources.workers

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage the DeepSpeed section asks for (0 when absent)."""
        zero = self.deepspeed.get("zero_optimization")
        stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
        try:
            return int(stage)
        except (TypeError, ValueError):  # "auto" or another invalid stage: already reported
            return 0

    def data_sections(self) -> list[tuple[str, DataConfig]]:
        """``(dotted key, section)`` of the data section and each continual stage's own."""
        found: list[tuple[str, DataConfig]] = [("data", self.data)]
        if self.continual is not None:
            found += [
                (f"continual.stages.{i}.data", stage.data)
                for i, stage in enumerate(self.continual.stages)
                if stage.data is not None
            ]
        return found

    @property
    def uses_tokenizer(self) -> bool:
        """Whether the recipe tokenizes text: a tokenizer is named or a dataset is read."""
        return self.model.tokenizer is not None or any(
            d.kind == "dataset" for _, d in self.data_sections()
        )

    # ``${env:NAME}`` references the recipe was written with (orchestrator.envrefs):
    # the fields hold the resolved values, what is stored and shipped holds these.
    _env_refs: dict[str, tuple[str, str]] = PrivateAttr(default_factory=dict)

    @property
    def env_refs(self) -> dict[str, tuple[str, str]]:
        """``{dotted_key: (written string, resolved value)}`` of the recipe's ``${env:NAME}``
        references."""
        return dict(self._env_refs)

    def with_env_refs(self, refs: dict[str, tuple[str, str]]) -> Recipe:
        """This recipe, remembering ``refs`` (set by the loader, which resolved them)."""
        out = self.model_copy()
        out._env_refs = dict(refs)
        return out
