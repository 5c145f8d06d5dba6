"""Secrets never reach MLflow or the logs, end to end on a tiny real `regimen run`.

Secrets are planted in the recipe (tracking tags named like a token and a password, a
free-form string that embeds an environment secret) and in the
environment (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, MY_SERVICE_API_KEY). After the run, no
secret value may appear in any MLflow param, tag, metric key or artifact file (recipe.yaml,
events), in stdout/stderr of `regimen run` (worker logs forwarded), or in the spool files.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from chaos.run_helpers import mlp_recipe, regimen, write_recipe

pytestmark = pytest.mark.integration

RECIPE_SECRETS = {
    "tag": "tag-secret-Zq8w3E1rT6yU",
    "ds": "ds-password-Kd93LmQ0pX7v",
}
ENV_SECRETS = {
    "HF_TOKEN": "hf_envsecret_Vb61Nc0aQp2w",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-Gh5Tr9Yx1Lk3",
    "MY_SERVICE_API_KEY": "apikey-envsecret-Wc7Ds2Fq9Zu",
}


def test_secrets_never_reach_mlflow_or_logs(tmp_path: Path) -> None:
    recipe = mlp_recipe(
        steps=6,
        every=3,
        description=f"pulls with {ENV_SECRETS['HF_TOKEN']} (an env secret pasted here)",
        tracking={
            "tags": {
                "api_token": RECIPE_SECRETS["tag"],
                "db_password": RECIPE_SECRETS["ds"],
                "team": "vision",
            }
        },
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = regimen(
        tmp_path, "run", str(path), "--json", env={**ENV_SECRETS, "REGIMEN_WORKER_LOGS": "1"}
    )
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED"

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(summary["run_id"])
    texts = {"stdout": out, "stderr": err}
    texts |= {f"param {k}": f"{k}={v}" for k, v in run.data.params.items()}
    texts |= {f"tag {k}": f"{k}={v}" for k, v in run.data.tags.items()}
    texts["metric keys"] = " ".join(run.data.metrics)
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "art")))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert "recipe.yaml" in {p.name for p in files}
    texts |= {f"artifact {p.name}": p.read_text(errors="replace") for p in files}
    run_dir = Path(summary["run_dir"])
    texts |= {
        f"run file {p.relative_to(run_dir)}": p.read_text(errors="replace")
        for p in run_dir.rglob("*")
        if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".txt", ".log")
    }
    for name, secret in {**RECIPE_SECRETS, **ENV_SECRETS}.items():
        leaks = [where for where, text in texts.items() if secret in text]
        assert not leaks, f"secret {name} leaked into {leaks}"
    # the redaction is visible, and non-secrets still arrive
    assert run.data.tags["api_token"] == "***" and run.data.tags["team"] == "vision"
    assert run.data.tags["db_password"] == "***"
    assert "***" in run.data.params["description"]


REF_VALUE = "ref-value-Px4Ty8Mn2Qw6"  # its name does not look secret: only the reference hides it


def test_env_references_resolve_on_workers_and_never_reach_mlflow_or_logs(tmp_path: Path) -> None:
    """``${env:NAME}`` in a recipe: the run trains (each worker resolved the reference from
    its own environment, or its recipe would not validate), and the value appears nowhere."""
    recipe = mlp_recipe(
        steps=3,
        every=3,
        tracking={
            "tags": {"api_token": "${env:E2E_PLAIN_VALUE}", "team": "${env:E2E_PLAIN_VALUE}"}
        },
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)
    env = {"E2E_PLAIN_VALUE": REF_VALUE, "REGIMEN_WORKER_LOGS": "1"}
    proc = regimen(tmp_path, "run", str(path), "--json", env=env)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(summary["run_id"])
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "art")))
    texts = [out, err, repr(run.data.params), repr(run.data.tags)]
    texts += [p.read_text(errors="replace") for p in artifacts.rglob("*") if p.is_file()]
    texts.append((tmp_path / "mlflow.db").read_bytes().decode("latin-1"))
    assert not [t for t in texts if REF_VALUE in t]
    assert run.data.tags["team"] == run.data.tags["api_token"] == "${env:E2E_PLAIN_VALUE}"
    assert run.data.params["tracking.tags.team"] == "${env:E2E_PLAIN_VALUE}"
