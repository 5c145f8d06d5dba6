"""The core recipe sections (model, data, optimizer, schedule, ...) and their two bases.

Every section forbids unknown keys and is immutable. :class:`TechniqueConfig` is the
base of every technique's section (see :mod:`orchestrator.recipe.catalog`). Nothing here
imports torch or the worker side: validating a recipe needs only pydantic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from orchestrator.recipe.builtin_models import DEFAULTS, unknown_keys
from orchestrator.recipe.storage import REMOTE_SCHEMES, is_remote

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, fields are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TechniqueConfig(Section):
    """Base of every technique's config section: unknown keys are errors."""

    enabled: bool = True


class ModelConfig(Section):
    """Which network to train.

    `kind: hf_config` builds a Hugging Face model with random weights from `config`;
    `kind: hf_pretrained` loads `path` (a local directory) with `from_pretrained`;
    `kind: factory` calls the user's `module:function` with `factory_args` (runs user code);
    `kind: builtin` builds Regimen's small classifiers, `architecture: vit | mlp`, sized by
    `config` (see orchestrator/engine/vision.py); its `task` defaults to classification.
    For `hf_config`, `architecture` is any transformers model type with a causal-LM class
    and `config` is checked against its config class (:mod:`orchestrator.recipe.hf_models`);
    for `hf_pretrained`, `config` overrides keys of the saved config.json, checked against
    the config class of its `model_type`.
    """

    kind: Literal["hf_config", "hf_pretrained", "factory", "builtin"] = "hf_config"
    architecture: str = Field(
        "llama",
        description="kind=hf_config: a transformers model type with a causal-LM class (llama, "
        "mistral, qwen2, qwen3, gemma, phi3, gpt_neox, olmo2, mixtral, gpt2, opt, falcon, ...); "
        "kind=builtin: vit or mlp.",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Config fields (hidden_size, num_hidden_layers, ...), checked against the "
        "architecture's config class: unknown keys and wrong value types are errors. "
        "kind=hf_pretrained: overrides of the saved config.json (attention_dropout, ...), "
        "checked against the config class of its model_type.",
    )
    attn_implementation: (
        Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"] | None
    ) = Field(
        None,
        description="HF attention kernel; default sdpa, or eager when the spike guard measures "
        "attention entropy (stability.indicators_every > 0), which needs the probabilities.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each block's activations in the backward pass (HF "
        "gradient_checkpointing_enable, non-reentrant): less memory, ~30% more compute.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype the HF weights are built or loaded in; bfloat16 needs precision: "
        "bf16, float16 needs precision: fp16.",
    )
    path: str | None = Field(None, description="Local directory for kind=hf_pretrained.")
    tokenizer: str | None = Field(
        None,
        description="Local tokenizer directory (save_pretrained); default: `path` for "
        "kind=hf_pretrained, none (byte tokens) otherwise. Needed by data.kind=dataset.",
    )
    factory: str | None = Field(None, description="'package.module:function' for kind=factory.")
    factory_args: dict[str, Any] = Field(default_factory=dict)
    task: Literal["causal_lm", "classification"] = "causal_lm"

    @model_validator(mode="before")
    @classmethod
    def _builtin_task(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "builtin" and "task" not in data:
            return {**data, "task": "classification"}  # builtin models are classifiers
        return data

    @model_validator(mode="after")
    def _kind_fields(self) -> ModelConfig:
        builtin = self.architecture in ("vit", "mlp")
        if self.kind == "builtin":
            if not builtin:
                raise ValueError("kind 'builtin' needs 'architecture: vit' or 'architecture: mlp'")
            if self.task != "classification":
                raise ValueError("kind 'builtin' models are classifiers: set task: classification")
            if bad := unknown_keys(self.architecture, self.config):
                allowed = ", ".join(sorted(DEFAULTS.get(self.architecture, {})))
                raise ValueError(
                    f"unknown config key(s) {bad} for builtin {self.architecture}: remove them "
                    f"(allowed: {allowed})"
                )
        elif builtin and self.kind == "hf_config":
            raise ValueError(
                f"architecture '{self.architecture}' is a builtin model: set kind: builtin"
            )
        if self.kind == "hf_pretrained" and not self.path:
            raise ValueError(
                "kind 'hf_pretrained' needs 'path': set model.path to a local model dir"
            )
        if self.kind == "factory" and (not self.factory or ":" not in self.factory):
            raise ValueError(
                "kind 'factory' needs 'factory: package.module:function' (the colon is required)"
            )
        return self

    @property
    def tokenizer_path(self) -> str | None:
        """The tokenizer directory the run uses: `tokenizer`, else `path` for hf_pretrained."""
        return self.tokenizer or (self.path if self.kind == "hf_pretrained" else None)


class DataConfig(Section):
    """Where training samples come from.

    `stdlib_bytes` reads the Python standard library's own source as byte tokens
    (needs no download); `text_files` reads `paths` as bytes; `factory` calls
    `module:function(seq_len=..., **factory_args)` returning a torch Dataset;
    `digits` is scikit-learn's 8x8 digits (1,797 images, 10 classes, ships with the
    package): a fixed seeded split (`eval_fraction`), normalised, images 1x8x8.
    `dataset` reads your files (`paths`: .jsonl .json .parquet .csv .txt, globs, or one
    `datasets.save_to_disk` directory) with the run's tokenizer (`model.tokenizer`) in a
    record `format`, tokenizes them once into `cache_dir` and packs them to `seq_len`
    (docs/DATA.md).
    """

    kind: Literal["stdlib_bytes", "text_files", "factory", "digits", "dataset"] = "stdlib_bytes"
    paths: list[str] = Field(
        default_factory=list,
        description="Files for kind=text_files; files, globs or one save_to_disk directory "
        "for kind=dataset.",
    )
    factory: str | None = None
    factory_args: dict[str, Any] = Field(default_factory=dict)
    seq_len: PositiveInt = 128
    max_bytes: PositiveInt = Field(2_000_000, description="Cap on bytes read for byte corpora.")
    eval_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    format: Literal["text", "chat", "instruction", "completion"] = Field(
        "text",
        description="kind=dataset record format: text (`text_field`), chat (`messages` of "
        "{role, content}, the tokenizer's chat template), instruction (instruction, input, "
        "output), completion (prompt, completion).",
    )
    text_field: str = Field("text", description="The raw-text column for format=text.")
    train_on_prompt: bool = Field(
        False, description="kind=dataset: loss on every token, not only the responses."
    )
    packing: bool = Field(
        True,
        description="kind=dataset: pack documents into seq_len (positions restart per "
        "document, no loss across documents); false pads each sample to seq_len.",
    )
    eval_paths: list[str] = Field(
        default_factory=list,
        description="kind=dataset: held-out files; when empty, eval_fraction of the records.",
    )
    cache_dir: str = Field(
        "~/.cache/regimen/data",
        description="kind=dataset: where tokenized data is kept, keyed by a fingerprint of "
        "the files, tokenizer, format, seq_len, packing and train_on_prompt.",
    )

    @model_validator(mode="after")
    def _kind_fields(self) -> DataConfig:
        if self.kind in ("text_files", "dataset") and not self.paths:
            raise ValueError(f"kind '{self.kind}' needs 'paths': list the files to read")
        if self.kind == "factory" and (not self.factory or ":" not in self.factory):
            raise ValueError("kind 'factory' needs 'factory: package.module:function'")
        return self


class OptimizerConfig(Section):
    """The base optimizer (techniques may wrap it). `lr` is the peak learning rate."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD only.")
    grad_clip: float = Field(1.0, ge=0.0, description="Global grad-norm clip; 0 disables.")


class ScheduleConfig(Section):
    """How long to train and how batches are formed.

    Global batch = micro_batch_size x grad_accumulation x workers.
    """

    steps: PositiveInt = Field(..., description="Optimizer steps to train.")
    micro_batch_size: PositiveInt = 8
    grad_accumulation: PositiveInt = 1
    log_every: PositiveInt = 1
    eval_every: NonNegativeInt = Field(0, description="Evaluate every N steps; 0 = only at end.")
    eval_batches: PositiveInt = 4


# `async` is a Python keyword, so the key is declared on a generated base class.
_CheckpointAsync: Any = create_model(  # type: ignore[call-overload]
    "_CheckpointAsync",
    __base__=Section,
    **{
        "async": (
            bool,
            Field(
                False,
                description="Write checkpoints in a background thread; training is blocked only "
                "for the copy to host memory.",
            ),
        )
    },
)


class CheckpointConfig(_CheckpointAsync):  # type: ignore[misc]
    """Where and how often checkpoints are written (atomic, with a SHA-256 manifest)."""

    every: NonNegativeInt = Field(50, description="Checkpoint every N steps; 0 = only at end.")
    keep: NonNegativeInt = Field(3, description="Newest checkpoints kept; 0 keeps all.")
    storage: str = Field(
        "./runs",
        description="Root of run storage: a directory (local or shared, e.g. NFS), or a URI "
        "that pyarrow's filesystems reach (s3://bucket/prefix, gs://..., hdfs://..., "
        "abfs://..., file:///...): then checkpoints are written under `local_dir` and every "
        "committed one is mirrored there, so a run resumes after its cluster is gone.",
    )
    local_dir: str = Field(
        "~/.cache/regimen/runs",
        description="Node-local working copy of run storage when `storage` is a URI.",
    )
    at_end: bool = True
    export: bool = Field(
        True,
        description="When a run of a Hugging Face model (kind hf_config / hf_pretrained) "
        "finishes, write its final model to `<run dir>/export/` with save_pretrained "
        "(safetensors, tokenizer, generation config), mirrored to `storage` like checkpoints.",
    )

    @field_validator("storage")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if "://" in value and not is_remote(value):
            raise ValueError(
                f"{value.partition('://')[0]}:// is not a storage Regimen can reach: use a "
                f"directory or one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}"
            )
        return value

    @property
    def local_root(self) -> Path:
        """The local directory runs live in: `storage`, or `local_dir` for a storage URI."""
        return Path(self.local_dir if is_remote(self.storage) else self.storage).expanduser()

    @property
    def is_async(self) -> bool:
        """The `async` key (a Python keyword, so not an attribute name)."""
        return bool(getattr(self, "async"))


class ResourcesConfig(Section):
    """What each job asks Ray for."""

    workers: PositiveInt = 2
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    memory_per_worker_gb: float | None = Field(None, gt=0.0)
    accelerator_type: str | None = None
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_restarts: NonNegativeInt = Field(2, description="Worker-crash restarts before failing.")
    threads_per_worker: PositiveInt | None = Field(
        None, description="torch intra-op threads per worker; default = cpus_per_worker."
    )
    launcher: Literal["workers", "ray_train"] = Field(
        "workers",
        description="How a job's ranks start: `workers`, Regimen's own group of Ray actors "
        "(one per rank, kept warm across a sweep's variants: process start and imports are "
        "paid once per concurrency slot); `ray_train`, a Ray Train TorchTrainer per job.",
    )

    @property
    def device(self) -> Literal["cuda", "cpu"]:
        """The device every worker trains on: CUDA when it asks Ray for GPUs, else the CPU.

        The one rule for the accelerator: each worker applies it to what Ray gave it
        (``cluster.launch.worker_accelerator``), never to the submitting machine's hardware.
        """
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


class TrackingConfig(Section):
    """MLflow settings. `password`/`token` style values are redacted everywhere; write
    secrets as `${env:NAME}` (resolved at load, stored as the reference)."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "regimen"
    run_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    log_model: bool = Field(
        True,
        description="Record the exported model (`checkpoint.export`) in MLflow as a logged "
        "model of the run (mlflow.transformers flavor), linked to its final metrics.",
    )
    system_metrics: bool = Field(
        True,
        description="Every worker logs MLflow's system metrics into the run: CPU, RAM, disk, "
        "network and, with `nvidia-ml-py` installed (`pip install regimen[gpu-metrics]`), "
        "each GPU's utilisation, memory and power; named `system/rank<R>-<node>/<metric>`, "
        "shown in the MLflow UI's System metrics tab.",
    )
    system_metrics_interval_s: float = Field(
        10.0,
        gt=0,
        description="Seconds between system-metric samples on each worker (MLflow's "
        "`MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` overrides it).",
    )


class SweepConfig(Section):
    """Variants: `grid` is the cross product of its lists; `zip` advances its lists together.

    Keys are dotted recipe paths, e.g. `optimizer.lr: [1e-3, 3e-3]`.
    """

    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] = Field(default_factory=dict)
    max_concurrent: PositiveInt = 2

    @model_validator(mode="after")
    def _zip_lengths(self) -> SweepConfig:
        lengths = {len(v) for v in self.zip.values()}
        if len(lengths) > 1:
            raise ValueError("all 'zip' lists must have the same length")
        for key, values in {**self.grid, **self.zip}.items():
            if not values:
                raise ValueError(f"sweep list for '{key}' is empty: give at least one value")
        return self
