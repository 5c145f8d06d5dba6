"""`model.kind: hf_pretrained` with `model.config` overrides, on the example pretrained tiny
LLaMA (the `tiny_pretrained` fixture): `regimen validate` refuses a typo'd key at its line
with a did-you-mean, and a valid override takes effect on the model the Trainer trains (and
on the model it exports)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import TINY_RECIPE, cli_exit, tiny_recipe

pytestmark = pytest.mark.integration


def _pretrained(tiny_pretrained: Path, config: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "hf_pretrained", "path": str(tiny_pretrained / "model"), "config": config}


def test_a_typo_in_a_pretrained_override_is_refused_at_its_line(
    tmp_path: Path, tiny_pretrained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {**TINY_RECIPE, "model": _pretrained(tiny_pretrained, {"attention_dropuot": 0.25})}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if "dropuot" in ln)
    code, _, err = cli_exit(capsys, "validate", str(path))
    assert code == 2
    assert (
        f"{path}:{line}: model.config.attention_dropuot: unknown key for LlamaConfig; "
        "did you mean 'attention_dropout'?" in err
    )


@pytest.mark.usefixtures("gloo_world")
def test_a_valid_override_takes_effect_on_the_trained_model(
    tmp_path: Path, tiny_pretrained: Path
) -> None:
    from orchestrator.engine.trainer import Trainer, WorkerContext

    saved = json.loads((tiny_pretrained / "model" / "config.json").read_text())
    assert saved["attention_dropout"] == 0.0  # the override is what changes it
    recipe = tiny_recipe(
        tmp_path,
        replace={"model": _pretrained(tiny_pretrained, {"attention_dropout": 0.25})},
        data={"max_bytes": 20_000},
        schedule={"steps": 2, "micro_batch_size": 2},
        checkpoint={"every": 0},
    )
    trainer = Trainer(recipe, WorkerContext(run_dir=tmp_path / "run"))
    summary = trainer.run()
    assert summary["finished"]
    module = trainer.built.engine.module
    assert module.config.attention_dropout == 0.25
    assert {layer.self_attn.attention_dropout for layer in module.model.layers} == {0.25}
    exported = json.loads((Path(summary["export"]["path"]) / "config.json").read_text())
    assert exported["attention_dropout"] == 0.25
