"""`continual:`: the config of continual learning (stages, replay, evaluation), checks, plan.

The technique (stage data, replay buffer, continual evaluation) is
:mod:`orchestrator.techniques.continual.technique`; see docs/CONTINUAL.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.recipe.sections import (
    DataConfig,
    NonNegativeInt,
    PositiveInt,
    Section,
    TechniqueConfig,
)

if TYPE_CHECKING:
    from orchestrator.recipe.schema import Recipe


class StageConfig(Section):
    """One continual-learning stage (one task), trained for `steps` optimizer steps in order.

    `data` defaults to the top-level data section; `classes` keeps only those class ids
    (classification), e.g. `classes: [0, 1]` on digits for class-incremental splits.
    """

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=100)
    steps: PositiveInt = Field(..., description="Optimizer steps of this stage.")
    data: DataConfig | None = Field(None, description="This stage's data; default: `data:`.")
    classes: list[NonNegativeInt] | None = Field(
        None, description="Keep only samples with these labels (classification only)."
    )
    restart_schedule: bool = Field(
        False,
        description="Restart techniques.warmup's warmup/decay at this stage, over its own steps.",
    )
    replay: bool = Field(True, description="Mix replay samples into this stage's batches.")

    @field_validator("classes")
    @classmethod
    def _classes(cls, classes: list[int] | None) -> list[int] | None:
        if classes is not None and (not classes or len(set(classes)) != len(classes)):
            raise ValueError("give a non-empty list of distinct class ids, e.g. [0, 1]")
        return classes


class ReplayConfig(Section):
    """The replay buffer: `size` sample indices kept by `policy`; `ratio` of every micro-batch
    (rounded: exactly round(ratio x micro_batch_size) samples) comes from it once non-empty."""

    size: NonNegativeInt = Field(0, description="Samples kept (indices); 0 = no replay.")
    policy: Literal["reservoir", "class_balanced", "task_balanced"] = "reservoir"
    ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of each micro-batch replayed.")

    @model_validator(mode="after")
    def _sized(self) -> ReplayConfig:
        if self.ratio > 0 and self.size == 0:
            raise ValueError(
                f"ratio {self.ratio} needs a buffer: set size > 0 (e.g. size: 200) or ratio: 0"
            )
        return self


class ContinualEvalConfig(Section):
    """Continual evaluation: every `every` steps (and at each stage's end) on a fixed subset
    of `subset_size` eval samples of each task seen so far (all tasks with include_future)."""

    every: NonNegativeInt = Field(10, description="Evaluate every N steps; 0 = stage ends only.")
    subset_size: PositiveInt = Field(200, description="Eval samples per task (fixed subset).")
    include_future: bool = Field(False, description="Also evaluate tasks not yet trained.")


class ContinualConfig(TechniqueConfig):
    """`continual:`: ordered stages, a replay buffer and continual evaluation
    (min-ACC, WC-ACC, windowed forgetting: De Lange et al. 2023). The stages' steps must
    sum to schedule.steps."""

    stages: list[StageConfig] = Field(..., min_length=1, description="Stages, in order.")
    replay: ReplayConfig = ReplayConfig()
    eval: ContinualEvalConfig = ContinualEvalConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> ContinualConfig:
        names = [s.name for s in self.stages]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"stage names must be unique; repeated: {dupes}: rename them")
        return self


def check(cfg: ContinualConfig, recipe: Recipe) -> list[tuple[str, str]]:
    """Stages sum to schedule.steps; classes, restarts and replay fit the rest of the recipe."""
    problems: list[tuple[str, str]] = []
    total = sum(s.steps for s in cfg.stages)
    if total != recipe.schedule.steps:
        problems.append(
            (
                "continual.stages",
                f"the stages' steps sum to {total} but schedule.steps is "
                f"{recipe.schedule.steps}: set schedule.steps: {total} or change the stages' steps",
            )
        )
    classification = recipe.model.task == "classification"
    for i, stage in enumerate(cfg.stages):
        if stage.classes is not None and not classification:
            problems.append(
                (
                    f"continual.stages.{i}.classes",
                    "classes need a classifier (model.task: classification): remove classes",
                )
            )
        warm = getattr(recipe.techniques, "warmup", None)
        if stage.restart_schedule:
            if warm is None or not warm.enabled:
                problems.append(
                    (
                        f"continual.stages.{i}.restart_schedule",
                        "restarts techniques.warmup's schedule, which is not configured: "
                        "add techniques.warmup or remove restart_schedule",
                    )
                )
            elif warm.resolved_warmup(stage.steps) >= stage.steps:
                problems.append(
                    (
                        f"continual.stages.{i}.restart_schedule",
                        f"the restarted warmup ({warm.resolved_warmup(stage.steps)} steps) must "
                        f"be shorter than the stage ({stage.steps} steps): use warmup_fraction "
                        "or fewer warmup_steps",
                    )
                )
    if cfg.replay.policy == "class_balanced" and not classification:
        problems.append(
            (
                "continual.replay.policy",
                "class_balanced needs class labels (model.task: classification): "
                "use task_balanced or reservoir",
            )
        )
    k = round(cfg.replay.ratio * recipe.schedule.micro_batch_size)
    if cfg.replay.ratio > 0 and k == 0:
        problems.append(
            (
                "continual.replay.ratio",
                f"ratio {cfg.replay.ratio} x micro_batch_size {recipe.schedule.micro_batch_size} "
                "rounds to 0 replayed samples per micro-batch: raise the ratio or the batch",
            )
        )
    return problems


def describe(cfg: ContinualConfig, recipe: Recipe) -> dict[str, object]:
    """Each stage's step range and data, the replay mix, the evaluation cadence."""
    stages, start = [], 0
    for s in cfg.stages:
        what = f"classes {s.classes}" if s.classes is not None else (s.data or recipe.data).kind
        extra = (", LR restart" if s.restart_schedule else "") + ("" if s.replay else ", no replay")
        stages.append(f"{s.name} steps [{start}, {start + s.steps}) {what}{extra}")
        start += s.steps
    r = cfg.replay
    k = round(r.ratio * recipe.schedule.micro_batch_size)
    mb = recipe.schedule.micro_batch_size
    return {
        "stages": stages,
        "replay": f"{r.policy} size {r.size}, {k}/{mb} per micro-batch"
        if r.size and r.ratio
        else "off",
        "eval": f"every {cfg.eval.every or 'stage end'}, {cfg.eval.subset_size} samples per task",
    }
