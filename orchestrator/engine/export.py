"""Take the model home: a trained model as a Hugging Face directory (``save_pretrained``).

Two ways in, one writer (:func:`write_hf_dir`):

* :func:`export_model`: the live engine at the end of a run (every rank calls it). ZeRO-0/1/2
  modules hold their full weights on every rank; under ZeRO-3 each parameter is gathered in
  turn (``deepspeed.zero.GatheredParameters``) and copied to rank 0's host memory, so no rank
  ever holds more than one whole parameter on its device. Rank 0 writes.
* :func:`export_checkpoint`: a committed checkpoint (``regimen export``). The caller has
  verified it (manifest, pickle scan); its weights are read with the weights-only unpickler
  (:func:`~orchestrator.engine.checkpoint.safety.weights_only_loads`): the module state of
  ``ds/mp_rank_00_model_states.pt`` for ZeRO-0/1/2, the ZeRO-3 partitions consolidated by
  DeepSpeed's own ``zero_to_fp32`` API. The recipe stored with the run rebuilds the model.

The directory holds ``config.json``, ``model.safetensors`` (or its shards),
``generation_config.json``, the tokenizer the run used (``ModelConfig.tokenizer_path``) and
``regimen-export.json`` (step, source, every file's SHA-256), written last. It is written as
a temp directory beside the target and renamed into place: a reader sees the previous export
or the complete new one, never a part.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.engine.checkpoint.io import sha256_file
from orchestrator.engine.checkpoint.safety import weights_only_loads
from orchestrator.errors import CheckpointError
from orchestrator.rundir import atomic_write_json, fsync_dir
from orchestrator.tracking.model import has_tokenizer

if TYPE_CHECKING:
    from orchestrator.engine.checkpoint import CheckpointInfo
    from orchestrator.recipe.schema import ModelConfig, Recipe

EXPORT_RECORD = "regimen-export.json"
HF_KINDS = ("hf_config", "hf_pretrained")
DS_TAG = "ds"  # the DeepSpeed tag of every checkpoint (CheckpointStore)
Progress = Callable[[str], None]


def exportable(cfg: ModelConfig) -> bool:
    """Whether a model section builds a Hugging Face model that ``save_pretrained`` writes."""
    return cfg.kind in HF_KINDS


def _zero3(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gathered_state_dict(module: torch.nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """Collective under ZeRO-3: the module's full state dict on rank 0's CPU (None elsewhere).

    Parameters are gathered one at a time, in the same order on every rank; tied parameters
    (one tensor, several names) stay one tensor. Buffers are not partitioned."""
    import deepspeed

    params = dict(module.named_parameters(remove_duplicate=False))
    copies: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        param = params.get(name)
        if param is None or not hasattr(param, "ds_id"):
            out[name] = tensor.detach().cpu()
            continue
        if id(param) not in copies:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                copies[id(param)] = (
                    param.data.detach().cpu().clone() if rank == 0 else torch.empty(0)
                )
        out[name] = copies[id(param)]
    return out if rank == 0 else None


def write_hf_dir(
    module: Any,
    out_dir: str | Path,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    tokenizer_path: str | None = None,
    record: dict[str, Any] | None = None,
) -> Path:
    """Write ``module`` (a transformers ``PreTrainedModel``; or ``state_dict`` on its
    config) with ``save_pretrained`` to ``out_dir`` atomically; returns ``out_dir``.

    Also writes the generation config, the tokenizer of ``tokenizer_path`` (when that
    directory holds one) and :data:`EXPORT_RECORD` (``record`` plus every file's SHA-256),
    fsyncs, and renames the temp directory into place. An existing ``out_dir`` (an empty
    folder, or an earlier export) is replaced as a whole."""
    import transformers

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}-{time.monotonic_ns()}"
    old = out_dir.parent / f".tmp-old-{out_dir.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        module.save_pretrained(tmp, state_dict=state_dict)
        if not (tmp / "generation_config.json").is_file():
            gen = getattr(module, "generation_config", None)
            gen = gen or transformers.GenerationConfig.from_model_config(module.config)
            gen.save_pretrained(tmp)
        if tokenizer_path and has_tokenizer(tokenizer_path):
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                tokenizer_path, local_files_only=True
            )
            tokenizer.save_pretrained(tmp)
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                digest, size = sha256_file(p)  # fsyncs it too
                files[p.relative_to(tmp).as_posix()] = {"sha256": digest, "bytes": size}
        atomic_write_json(tmp / EXPORT_RECORD, {**(record or {}), "files": files})
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            fsync_dir(d)
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def exported_files(out_dir: str | Path) -> list[str]:
    """The files an export's record lists (every file of the directory but the record)."""
    record = json.loads((Path(out_dir) / EXPORT_RECORD).read_text())
    return sorted(record["files"])


def export_model(
    engine_or_module: Any,
    out_dir: str | Path,
    tokenizer_path: str | None,
    *,
    rank: int = 0,
    record: dict[str, Any] | None = None,
) -> Path | None:
    """Write a DeepSpeed engine's (or a plain module's) model to ``out_dir`` as a Hugging Face
    directory; the path on rank 0, None elsewhere.

    Collective when the module is ZeRO-3 partitioned (every rank must call it); rank 0
    writes (:func:`write_hf_dir`)."""
    module = getattr(engine_or_module, "module", engine_or_module)
    state = gathered_state_dict(module, rank) if _zero3(module) else None
    if rank != 0:
        return None
    return write_hf_dir(
        module, out_dir, state_dict=state, tokenizer_path=tokenizer_path, record=record
    )


def checkpoint_state_dict(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The model weights of a committed, verified checkpoint, read weights-only.

    ZeRO-0/1/2: the module state in ``ds/mp_rank_00_model_states.pt`` (what the engine's
    module held); ZeRO-3: every rank's partitions consolidated by DeepSpeed's
    ``get_fp32_state_dict_from_zero_checkpoint`` (fp32)."""
    ds = info.path / DS_TAG
    single = ds / "mp_rank_00_model_states.pt"
    with weights_only_loads(None):
        if single.is_file():
            state = torch.load(single, map_location="cpu", weights_only=True)
            module = state.get("module") if isinstance(state, dict) else None
            if not isinstance(module, dict) or not module:
                raise CheckpointError(f"{single} holds no module weights")
            return dict(module)
        if not any(ds.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
            raise CheckpointError(f"{ds} holds no DeepSpeed model states")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(info.path), tag=DS_TAG))


def export_checkpoint(
    recipe: Recipe,
    info: CheckpointInfo,
    out_dir: str | Path,
    *,
    on_progress: Progress | None = None,
    record: dict[str, Any] | None = None,
) -> Path:
    """Rebuild the recipe's model, load checkpoint ``info``'s weights into it and write it to
    ``out_dir`` (:func:`write_hf_dir`). ``info`` must have been verified by the caller
    (``CheckpointStore.verify`` and ``scan_pickles``)."""
    from orchestrator.engine.tasks import build_task_model

    say = on_progress or (lambda _: None)
    say(f"reading the weights of checkpoint step {info.step} ({info.path})")
    state = checkpoint_state_dict(info)
    say(f"rebuilding {recipe.model.kind} model and loading {len(state)} tensors")
    model = build_task_model(recipe.model, recipe.seed)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint step {info.step} ({info.path}) does not fit the run's model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.eval()
    say(f"writing {out_dir}")
    return write_hf_dir(
        model,
        out_dir,
        tokenizer_path=recipe.model.tokenizer_path,
        record={"step": info.step, "source": str(info.path), **(record or {})},
    )
