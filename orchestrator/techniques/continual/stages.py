"""Stages: each stage's datasets (a class subset where asked) and the micro-batches of a step.

:class:`StageBatches` replaces the loop's ``BatchSource`` when a recipe has a
``continual:`` section. The stage is chosen by the step about to run; fresh samples
come from that stage's own seeded endless order at the loop's stream position
(``cursor``), exactly as ``BatchSource`` lays them out, except that the last ``k``
positions of every micro-batch slot are not used: ``k = round(ratio * micro_batch)``
buffer samples take their place. Cursor arithmetic, resume and skip ranges are
therefore unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.data import SampleOrder, build_data, collate
from orchestrator.errors import UsageError
from orchestrator.techniques.continual.replay import ReplayBuffer, draw_generator, replay_count

if TYPE_CHECKING:
    from orchestrator.recipe.schema import ContinualConfig, Recipe

EVAL_SUBSET_SEED = 4_242  # the per-task eval subsets are fixed, whatever the recipe's seed


class SubsetDataset:
    """The samples of ``base`` at ``indices`` (a class subset), re-indexed from 0."""

    def __init__(self, base: Any, indices: torch.Tensor):
        self.base = base
        self.indices = indices
        base_labels = labels_of(base)
        self.labels = base_labels[indices] if base_labels is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.base[int(self.indices[i])]  # type: ignore[no-any-return]


def labels_of(dataset: Any) -> torch.Tensor | None:
    """Class ids of every sample (a ``labels`` tensor attribute, or scalar ``labels`` entries)."""
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor):
        return labels
    if dataset is None or len(dataset) == 0:
        return None
    first = dataset[0].get("labels") if isinstance(dataset[0], dict) else None
    if not isinstance(first, torch.Tensor) or first.ndim != 0:
        return None
    return torch.stack([dataset[i]["labels"] for i in range(len(dataset))])


@dataclass
class Stage:
    """One stage: its step range ``[start, end)``, data and fixed eval subset."""

    index: int
    name: str
    start: int
    end: int
    train: Any
    eval: Any
    labels: torch.Tensor | None
    order: SampleOrder
    eval_subset: list[int]
    restart_schedule: bool
    replay: bool
    classes: list[int] | None

    @property
    def steps(self) -> int:
        """Optimizer steps of the stage."""
        return self.end - self.start


def _subset(dataset: Any, classes: list[int] | None, where: str) -> Any:
    if classes is None or dataset is None:
        return dataset
    labels = labels_of(dataset)
    if labels is None:
        raise UsageError(f"{where}.classes: the data has no class labels: remove classes")
    keep = torch.isin(labels, torch.tensor(classes)).nonzero().flatten()
    if len(keep) == 0:
        raise UsageError(f"{where}.classes: no sample has a label in {classes}: fix the ids")
    return SubsetDataset(dataset, keep)


def build_stages(cfg: ContinualConfig, recipe: Recipe) -> list[Stage]:
    """Every stage's datasets; identical data sections are built once."""
    cache: dict[str, Any] = {}
    stages: list[Stage] = []
    start = 0
    for i, sc in enumerate(cfg.stages):
        data_cfg = sc.data or recipe.data
        key = json.dumps(data_cfg.model_dump(mode="json"), sort_keys=True)
        if key not in cache:
            cache[key] = build_data(data_cfg, recipe.model.tokenizer_path)
        split = cache[key]
        where = f"continual.stages.{i}"
        train = _subset(split.train, sc.classes, where)
        evalset = _subset(split.eval, sc.classes, where)
        if evalset is None or len(evalset) == 0:
            evalset = train  # no eval split: continual eval falls back to training samples
        gen = torch.Generator().manual_seed(EVAL_SUBSET_SEED + i)
        subset = torch.randperm(len(evalset), generator=gen)[: cfg.eval.subset_size].tolist()
        stages.append(
            Stage(
                index=i,
                name=sc.name,
                start=start,
                end=start + sc.steps,
                train=train,
                eval=evalset,
                labels=labels_of(train),
                order=SampleOrder(len(train), recipe.seed * 31 + i),
                eval_subset=subset,
                restart_schedule=sc.restart_schedule,
                replay=sc.replay,
                classes=sc.classes,
            )
        )
        start += sc.steps
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that trains optimizer step ``step`` (0-based; past the end: the last)."""
    for stage in stages:
        if step < stage.end:
            return stage
    return stages[-1]


class StageBatches:
    """A drop-in for ``BatchSource``: the micro-batches of the step ``step_of()`` returns."""

    def __init__(
        self,
        stages: list[Stage],
        buffer: ReplayBuffer,
        ratio: float,
        *,
        seed: int,
        micro_batch: int,
        grad_accumulation: int,
        rank: int,
        world_size: int,
        step_of: Callable[[], int],
    ):
        self.stages, self.buffer, self.ratio = stages, buffer, ratio
        self.seed, self.micro_batch, self.grad_accumulation = seed, micro_batch, grad_accumulation
        self.rank, self.world_size, self.step_of = rank, world_size, step_of

    def replayed(self, step: int) -> int:
        """Buffer samples per micro-batch at ``step`` (same on every rank)."""
        if not stage_at(self.stages, step).replay:
            return 0
        return replay_count(self.ratio, self.micro_batch, len(self.buffer))

    def micro_batch_at(self, cursor: int, micro: int) -> dict[str, torch.Tensor]:
        """This rank's ``micro``-th micro-batch of the step at ``cursor``: fresh + replayed."""
        step = self.step_of()
        stage, k = stage_at(self.stages, step), self.replayed(step)
        start = cursor + (micro * self.world_size + self.rank) * self.micro_batch
        fresh = [stage.train[stage.order.index(start + j)] for j in range(self.micro_batch - k)]
        picks = self.buffer.draw(k, draw_generator(self.seed, step, self.rank, micro))
        return collate(fresh + [self.stages[t].train[i] for t, i in picks])

    def fresh_ids(self, cursor: int, step: int) -> list[tuple[int, int, int]]:
        """``(task, index, label)`` of every fresh sample of the step, all ranks, fixed order."""
        stage, k = stage_at(self.stages, step), self.replayed(step)
        out = []
        for micro in range(self.grad_accumulation):
            for rank in range(self.world_size):
                start = cursor + (micro * self.world_size + rank) * self.micro_batch
                for j in range(self.micro_batch - k):
                    idx = stage.order.index(start + j)
                    label = int(stage.labels[idx]) if stage.labels is not None else -1
                    out.append((stage.index, idx, label))
        return out
