"""The exported model in MLflow: an MLflow 3 logged model of the run, linked to its metrics.

:func:`log_hf_model` records a Hugging Face directory (what ``engine/export`` writes) as a
``LoggedModel`` whose source run is the job run, listed among the run's outputs at the final
step, with the job's final metrics linked to it (``Metric.model_id``, logged once, by the
driver's summary), much as ``mlflow.<flavor>.log_model`` does, but through the one client of
:mod:`orchestrator.tracking.client` (no fluent run state, the URI given, not the global one).
With a tokenizer it is saved in the ``transformers`` flavor (a text-generation pipeline):
``mlflow.transformers.load_model("models:/<model_id>")`` gives it back. Without one (byte
tokens) the directory itself is the model's artifacts (``from_pretrained`` after
``mlflow.artifacts.download_artifacts``). Nothing from the recipe is copied to the logged
model (params or tags): no secret can reach it.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.tracking.client import mlflow_client, mlflow_errors
from orchestrator.tracking.sink import mlflow_key

MODEL_NAME = "model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_PINNED = ("torch", "transformers", "tokenizers", "safetensors", "accelerate")


def pip_requirements() -> list[str]:
    """What loading the logged model needs, pinned to this environment's versions (MLflow's
    own inference would start a process and import torchvision, which may be absent)."""
    out = []
    for name in _PINNED:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def has_tokenizer(path: str | Path) -> bool:
    """Whether directory ``path`` holds a tokenizer ``AutoTokenizer`` can load."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def _save_flavor(model_dir: Path, dest: Path, logged: Any, run_id: str) -> bool:
    """Save ``model_dir`` to ``dest`` in the transformers flavor; False without a tokenizer."""
    import mlflow.transformers
    import transformers
    from mlflow.models import Model

    if not has_tokenizer(model_dir):
        return False
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    meta = Model(
        artifact_path=logged.artifact_location,
        run_id=run_id,
        model_id=logged.model_id,
        model_uuid=logged.model_id,
    )
    mlflow.transformers.save_model(
        {"model": model, "tokenizer": tokenizer},
        path=str(dest),
        task="text-generation",
        mlflow_model=meta,
        pip_requirements=pip_requirements(),
    )
    return True


def log_hf_model(
    tracking_uri: str,
    run_id: str,
    model_dir: str | Path,
    *,
    step: int,
    metrics: Mapping[str, float] | None = None,
    name: str = MODEL_NAME,
) -> str:
    """Record ``model_dir`` (a ``save_pretrained`` directory) as a logged model of ``run_id``
    at ``step``; its model id. ``metrics`` are logged to the run linked to the model: pass
    only keys the run has no point of at ``step`` yet (a metric logged again is a second point
    in the run's history); the driver links the job's final metrics
    (:func:`~orchestrator.tracking.runs.log_summary`). A failure ends the logged model FAILED
    and raises TrackingError."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

    model_dir = Path(model_dir)
    client = mlflow_client(tracking_uri)
    with mlflow_errors(f"log the model of run {run_id}", tracking_uri):
        experiment = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(
            experiment, name=name, source_run_id=run_id, tags={"regimen.step": str(step)}
        )
        try:
            with tempfile.TemporaryDirectory() as tmp:
                dest = Path(tmp) / name
                if _save_flavor(model_dir, dest, logged, run_id):
                    client.log_model_artifacts(logged.model_id, str(dest))
                else:
                    client.log_model_artifacts(logged.model_id, str(model_dir))
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
            ts = int(time.time() * 1000)
            points = [
                Metric(mlflow_key(k), float(v), ts, step, model_id=logged.model_id)
                for k, v in (metrics or {}).items()
            ]
            if points:
                client.log_batch(run_id, metrics=points, synchronous=True)
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        except BaseException:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
    return str(logged.model_id)
