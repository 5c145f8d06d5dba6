"""JobSpec: the facts of one job, computed once, the same for `run` and `resume`."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_recipe
from orchestrator.recipe.jobspec import JobSpec, absolute_tracking_uri
from orchestrator.recipe.loader import load_recipe_text


def test_a_relative_sqlite_store_is_pinned_to_the_driver_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = JobSpec.of("v", tiny_recipe(tmp_path, tracking={"uri": "sqlite:///mlflow.db"}))
    assert spec.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert spec.recipe.tracking.uri == spec.tracking_uri  # what the workers will see
    assert absolute_tracking_uri("http://host:5000") == "http://host:5000"
    assert absolute_tracking_uri("sqlite:///:memory:") == "sqlite:///:memory:"


def test_a_fresh_job_is_named_by_its_run_and_its_workers_get_the_same_recipe(
    tmp_path: Path,
) -> None:
    recipe = tiny_recipe(tmp_path)
    spec = JobSpec.of("v", recipe, parent_run_id="sweep", tags={"a": "1"})
    assert spec.run_dir("abc") == (tmp_path / "runs" / "abc").resolve()
    config = spec.worker_config(spec.run_dir("abc"), "abc")
    assert config["run_id"] == "abc" and config["resume_step"] is None
    assert load_recipe_text(config["recipe_yaml"], name="recipe.yaml") == spec.recipe
    assert spec.with_tags(b="2").tags == {"a": "1", "b": "2"} and spec.tags == {"a": "1"}


@pytest.mark.parametrize("storage", ["local", "s3://bucket/prefix"])
def test_a_continued_job_trains_in_the_run_directory_it_continues(
    tmp_path: Path, storage: str
) -> None:
    """Whatever the recipe said about storage, the workers land in the existing directory
    (a storage URI keeps its mirror and moves only the local working copy)."""
    checkpoint = {"storage": str(tmp_path / "elsewhere")} if storage == "local" else {}
    if storage != "local":
        checkpoint = {"storage": storage, "local_dir": str(tmp_path / "cache")}
    recipe = tiny_recipe(tmp_path, checkpoint=checkpoint)
    run_dir = tmp_path / "found" / "old-run"
    spec = JobSpec.continuing(
        "v", recipe, kind="resume", tracking_uri="sqlite:///x.db", run_dir=run_dir,
        remote_storage=storage != "local", parent_run_id="old", tags={"regimen.segment": "1"},
    )  # fmt: skip
    assert spec.run_dir("new-mlflow-run") == run_dir.resolve()
    assert spec.parent_run_id == "old" and spec.kind == "resume"
    if storage != "local":
        assert spec.recipe.checkpoint.storage == storage  # the mirror stays where it was
    assert spec.tracking_uri.startswith("sqlite:////")


def test_relative_file_paths_are_pinned_to_the_driver_directory(tmp_path, monkeypatch):
    """Ray workers run in their own directory: data files, the cache, the tokenizer and the
    model directory must reach them absolute (globs and ~ kept)."""
    from conftest import tiny_recipe
    from orchestrator.recipe.jobspec import JobSpec

    monkeypatch.chdir(tmp_path)
    data = {"kind": "dataset", "paths": ["data/*.jsonl"], "eval_paths": ["held.jsonl"],
            "cache_dir": "cache", "format": "chat"}  # fmt: skip
    recipe = tiny_recipe(
        tmp_path,
        model={"kind": "hf_pretrained", "path": "m", "tokenizer": "~/tok"},
        data=data,
        continual={"stages": [{"name": "a", "steps": 4, "data": {**data, "paths": ["b.txt"]}},
                              {"name": "b", "steps": 4}]},
    )  # fmt: skip
    pinned = JobSpec.of("v", recipe).recipe
    assert pinned.model.path == str(tmp_path / "m") and pinned.model.tokenizer == "~/tok"
    assert pinned.data.paths == [str(tmp_path / "data" / "*.jsonl")]
    assert pinned.data.eval_paths == [str(tmp_path / "held.jsonl")]
    assert pinned.data.cache_dir == str(tmp_path / "cache")
    assert pinned.continual.stages[0].data.paths == [str(tmp_path / "b.txt")]
