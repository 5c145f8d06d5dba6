"""Secrets never reach MLflow: key detection, deep redaction, the recipe.yaml text, a real run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.tracking.redact import MASK, is_secret_key, redact, redact_string, redact_text

ENV_SECRET = "ray-auth-0123456789abcdef"


@pytest.mark.parametrize(
    "key",
    [
        "tracking.password",
        "data.hf_token",
        "a.b.api_key",
        "apiKey",
        "APIKEY",
        "aws_access_key_id",
        "ssh.private_key",
        "db.passwd",
        "client_secret",
        "gcp.credentials",
        "auth",
        "RAY_AUTH_TOKEN",
        "HF_TOKEN",
        "hfToken",
        "token",
        "Authorization",
    ],
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "data.tokenizer",
        "data.max_tokens",
        "model.config.pad_token",
        "model.config.eos_token_id",
        "optimizer.lr",
        "author",
        "name",
        "schedule.steps",
        "key",
    ],
)
def test_non_secret_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_redact_deep_copy() -> None:
    recipe: dict[str, Any] = {
        "tracking": {"uri": "http://u:hunter22@mlflow:5000", "password": "pw-1"},
        "data": {"hf_token": "hf_abc", "tokenizer": "gpt2", "items": [{"api_key": "k1"}, 3]},
        "creds": {"credentials": {"user": "x", "key": "y"}},
        "empty_token": None,
    }
    out = redact(recipe)
    assert recipe["data"]["hf_token"] == "hf_abc"  # input untouched
    assert out["tracking"] == {"uri": f"http://u:{MASK}@mlflow:5000", "password": MASK}
    assert out["data"] == {"hf_token": MASK, "tokenizer": "gpt2", "items": [{"api_key": MASK}, 3]}
    assert out["creds"]["credentials"] == MASK
    assert out["empty_token"] is None


def test_env_secret_values_are_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", ENV_SECRET)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # short values are not scrubbed
    assert redact_string(f"ray://head:10001?t={ENV_SECRET}") == f"ray://head:10001?t={MASK}"
    url = "https://hub/x?rev=main&access_token=abc123&api_key=k9#frag"
    assert redact_string(url) == f"https://hub/x?rev=main&access_token={MASK}&api_key={MASK}#frag"
    assert redact({"note": f"x {ENV_SECRET} y", "mode": "token"}) == {
        "note": f"x {MASK} y",
        "mode": "token",
    }


def test_redact_text_keeps_clean_text_byte_for_byte() -> None:
    text = "# a comment\nname: tiny\noptimizer: {lr: 0.001}\n"
    assert redact_text(text) == text


def test_redact_text_masks_and_keeps_order() -> None:
    text = "name: tiny\ntracking:\n  password: s3cret\n  uri: sqlite:///x.db\nseed: 1\n"
    out = redact_text(text)
    assert "s3cret" not in out
    data = yaml.safe_load(out)
    assert list(data) == ["name", "tracking", "seed"]
    assert data["tracking"] == {"password": MASK, "uri": "sqlite:///x.db"}


def test_redact_text_fallback_for_unparseable_yaml() -> None:
    text = "name: [unclosed\napi_key: abc123\n  nested_password: 'p w'\n"
    out = redact_text(text)
    assert "abc123" not in out and "p w" not in out
    assert "name: [unclosed" in out


def test_no_secret_reaches_mlflow(
    tmp_path: Path, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from orchestrator.tracking.runs import open_run, read_recipe_yaml

    monkeypatch.setenv("RAY_AUTH_TOKEN", ENV_SECRET)
    secrets = ["trk-pass-123", "hf_sEcReT_456", "nested-key-789", "hunter22", ENV_SECRET]
    recipe = {
        "name": "leaky",
        "tracking": {"uri": "http://alice:hunter22@mlflow:5000", "password": "trk-pass-123"},
        "data": {"hf_token": "hf_sEcReT_456", "tokenizer": "gpt2"},
        "model": {"hub": {"auth": {"api_key": "nested-key-789"}}, "cmd": f"run --t {ENV_SECRET}"},
    }
    run_id = open_run(
        uri,
        "redaction",
        "leaky",
        recipe=recipe,
        recipe_yaml=yaml.safe_dump(recipe, sort_keys=False),
        tags={"owner_token": "hf_sEcReT_456", "note": f"uses {ENV_SECRET}"},
        artifact_location=str(tmp_path / "artifacts"),
    )
    run = MlflowClient(uri).get_run(run_id)
    everything = json.dumps([run.data.params, run.data.tags]) + read_recipe_yaml(uri, run_id)
    for secret in secrets:
        assert secret not in everything
    assert run.data.params["data.tokenizer"] == "gpt2"
    assert run.data.params["tracking.password"] == MASK


@pytest.fixture
def uri(mlflow_uri: str) -> str:
    """A fresh MLflow sqlite store (tests/conftest.py)."""
    return mlflow_uri
