"""`JobSpec`: everything one job needs, decided once on the driver, consumed by `run` and
`resume` alike.

Expansion turns a recipe into variants; a variant plus where it runs and how it is tracked
is a job. `regimen run` makes one spec per variant (`JobSpec.of`); `regimen resume` and
`regimen rollback` make one that continues an existing run directory (`JobSpec.continuing`).
The controller opens the MLflow run from the spec, and the workers receive the part of it
they need (`worker_config`) as plain data: the recipe as YAML text, never a pickle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from orchestrator.recipe.schema import DataConfig, Recipe

JobKind = Literal["run", "resume", "rollback"]


def absolute_tracking_uri(uri: str) -> str:
    """Pin a relative sqlite/file URI to the driver's working directory.

    Ray workers run in their own working directory: a relative ``sqlite:///mlflow.db``
    there would be a different database.
    """
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            path = uri[len(scheme) :]
            if path and not path.startswith("/") and path != ":memory:":
                return scheme + str(Path(path).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def _absolute(path: str) -> str:
    """``path`` made absolute against this directory (``~`` paths and URIs stay as written;
    lexical, so globs keep their wildcards)."""
    if path.startswith("~") or "://" in path or os.path.isabs(path):
        return path
    return os.path.abspath(path)


def _pinned_data(data: DataConfig) -> DataConfig:
    return data.model_copy(
        update={
            "paths": [_absolute(p) for p in data.paths],
            "eval_paths": [_absolute(p) for p in data.eval_paths],
            "cache_dir": _absolute(data.cache_dir),
        }
    )


def pin_local_paths(recipe: Recipe) -> Recipe:
    """The recipe with its relative file paths (model and tokenizer directories, data files,
    the data cache, continual stages' data) pinned to the driver's working directory: Ray
    workers run in their own."""
    model = recipe.model.model_copy(
        update={
            "path": _absolute(recipe.model.path) if recipe.model.path else None,
            "tokenizer": _absolute(recipe.model.tokenizer) if recipe.model.tokenizer else None,
        }
    )
    update: dict[str, Any] = {"model": model, "data": _pinned_data(recipe.data)}
    if recipe.continual is not None:
        stages = [
            s.model_copy(update={"data": _pinned_data(s.data)}) if s.data is not None else s
            for s in recipe.continual.stages
        ]
        update["continual"] = recipe.continual.model_copy(update={"stages": stages})
    return recipe.model_copy(update=update)


@dataclass(frozen=True)
class JobSpec:
    """One job: a validated recipe, its tracking and storage facts, and its lineage.

    ``recipe.tracking.uri`` is already absolute (the workers' working directory is not the
    driver's). ``run_key`` names an existing run directory to continue; a new job's directory
    is named by its own MLflow run id. ``resume_step`` is the checkpoint to start from
    (None: the newest, -1: start fresh even if checkpoints exist).
    """

    name: str
    recipe: Recipe
    kind: JobKind = "run"
    parent_run_id: str | None = None
    run_key: str | None = None
    resume_step: int | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        name: str,
        recipe: Recipe,
        *,
        tracking_uri: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> JobSpec:
        """A fresh job of one variant, tracked at ``tracking_uri`` (default: the recipe's),
        pinned to this directory."""
        uri = absolute_tracking_uri(tracking_uri or recipe.tracking.uri)
        tracking = recipe.tracking.model_copy(update={"uri": uri})
        return cls(
            name=name,
            recipe=pin_local_paths(recipe).model_copy(update={"tracking": tracking}),
            parent_run_id=parent_run_id,
            tags=dict(tags or {}),
        )

    @classmethod
    def continuing(
        cls,
        name: str,
        recipe: Recipe,
        *,
        kind: JobKind,
        tracking_uri: str,
        run_dir: Path,
        remote_storage: bool,
        parent_run_id: str,
        tags: dict[str, str],
    ) -> JobSpec:
        """A job that goes on in the existing ``run_dir`` (resume or manual rollback).

        The recipe's storage is pointed at the directory's parent, so the workers find the
        run directory where the driver found it (``local_dir`` for a storage URI, whose
        mirror stays the recipe's ``storage``).
        """
        key = "local_dir" if remote_storage else "storage"
        recipe = pin_local_paths(recipe).model_copy(
            update={
                "tracking": recipe.tracking.model_copy(
                    update={"uri": absolute_tracking_uri(tracking_uri)}
                ),
                "checkpoint": recipe.checkpoint.model_copy(update={key: str(run_dir.parent)}),
            }
        )
        return cls(
            name=name,
            recipe=recipe,
            kind=kind,
            parent_run_id=parent_run_id,
            run_key=run_dir.name,
            tags=dict(tags),
        )

    @property
    def tracking_uri(self) -> str:
        """Where the job's MLflow runs live (absolute)."""
        return self.recipe.tracking.uri

    @property
    def recipe_data(self) -> dict[str, Any]:
        """The resolved recipe as plain data, secrets as their ``${env:NAME}`` references."""
        from orchestrator.recipe.loader import recipe_dict

        return recipe_dict(self.recipe)

    @property
    def recipe_yaml(self) -> str:
        """The resolved recipe as YAML: what MLflow stores and what the workers validate.

        Secrets stay ``${env:NAME}`` references: each worker resolves them from its own
        environment when it loads this text.
        """
        from orchestrator.recipe.loader import dump_recipe

        return dump_recipe(self.recipe)

    def run_dir(self, run_id: str) -> Path:
        """The job's run directory once its MLflow run ``run_id`` is open."""
        return self.recipe.checkpoint.local_root.resolve() / (self.run_key or run_id)

    def with_tags(self, **tags: str) -> JobSpec:
        """The same job with more tags (later ones win)."""
        return replace(self, tags={**self.tags, **tags})

    def worker_config(self, run_dir: Path, run_id: str) -> dict[str, Any]:
        """What every worker receives: plain data, the recipe as YAML text (secrets as
        ``${env:NAME}`` references, the tracking URI too)."""
        return {
            "recipe_yaml": self.recipe_yaml,
            "run_dir": str(run_dir),
            "tracking_uri": self.recipe_data["tracking"]["uri"],
            "run_id": run_id,
            "resume_step": self.resume_step,
        }
