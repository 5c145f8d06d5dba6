"""Throughput of the step loop: tokens/s always, MFU where the device's peak is known.

MFU (model FLOPs utilisation, PaLM, Chowdhery et al. 2022, appendix B) is the model FLOPs a
step needed divided by what the devices could have done in the step's time. The model
FLOPs of training on one token of a sequence of ``T`` tokens are

    6 N + 12 L d T

with ``N`` the parameters that take part in a matmul (all of them, less an input embedding
that is not tied to the output head: a lookup is no matmul), ``L`` layers and width ``d``
(the attention scores and their weighted sum, forward and backward). They count no
activation recomputation and ignore frozen weights (LISA, PEFT): MFU is a property of the
model and the hardware, not of what the run chose to skip.

The peak is a table of dense tensor-core figures of common NVIDIA GPUs per precision
(:data:`PEAK_FLOPS`); on the CPU, or on a device not in the table, MFU is left out. ``fp32``
uses the plain FP32 figure: PyTorch does not use TF32 for matmuls unless told to.

Counting costs no synchronisation: a micro-batch's token count is its shape, and the step
time is the loop's own start-to-start measure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# (substring of torch.cuda.get_device_name(), {precision: dense peak FLOP/s}); the first
# match wins, so the more specific names come first. Vendor datasheet figures (no sparsity).
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # and GH200
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("A10G", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12}),
    ("A40", {"bf16": 150e12, "fp16": 150e12, "fp32": 37.4e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
)


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """One device's dense peak FLOP/s at ``precision`` (``fp32``/``bf16``/``fp16``), or
    None when the device (or that precision on it) is not in :data:`PEAK_FLOPS`."""
    if not device_name:
        return None
    for pattern, peaks in PEAK_FLOPS:
        if pattern in device_name:
            return peaks.get(precision)
    return None


def flops_per_token(params: int, layers: int, width: int, seq_len: int) -> float:
    """Training FLOPs of one token: ``6 N + 12 L d T`` (see the module docstring)."""
    return 6.0 * params + 12.0 * layers * width * seq_len


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # a ZeRO-3 partition holds only its share


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs estimate needs to know of a model."""

    matmul_params: int
    layers: int
    width: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        """From a model: every parameter but an untied input embedding; the transformer's
        layers and width from an HF-style ``config`` (``num_hidden_layers``/``hidden_size``),
        none (no attention term) when it has no such config."""
        seen: set[int] = set()
        total = 0
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += _numel(p)
        get_in = getattr(model, "get_input_embeddings", None)
        get_out = getattr(model, "get_output_embeddings", None)
        emb_in = get_in() if callable(get_in) else None
        emb_out = get_out() if callable(get_out) else None
        w_in = getattr(emb_in, "weight", None)
        w_out = getattr(emb_out, "weight", None)
        if isinstance(w_in, torch.Tensor) and w_in is not w_out:
            total -= _numel(w_in)
        config = getattr(model, "config", None)
        layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        width = int(getattr(config, "hidden_size", 0) or 0)
        return cls(matmul_params=total, layers=layers, width=width)


class Throughput:
    """Counts a step's tokens and model FLOPs; turns them into ``tokens_per_s`` and ``mfu``.

    ``peak`` is one device's peak FLOP/s (None: no MFU); the run has ``devices`` of them.
    """

    def __init__(self, shape: ModelShape, peak: float | None, devices: int):
        self.shape = shape
        self.peak = peak
        self.devices = devices
        self._tokens = 0
        self._flops = 0.0

    @classmethod
    def for_run(cls, model: torch.nn.Module, device: Any, precision: str, devices: int) -> Any:
        """For ``model`` training on ``device`` (the engine's) at ``precision``."""
        peak = None
        if torch.device(device).type == "cuda" and torch.cuda.is_available():
            peak = peak_flops(torch.cuda.get_device_name(torch.device(device)), precision)
        return cls(ModelShape.of(model), peak, devices)

    def count(self, batch: Mapping[str, torch.Tensor]) -> None:
        """One micro-batch of this rank (its ``input_ids``; batches without tokens, e.g.
        images, count none)."""
        ids = batch.get("input_ids")
        if ids is None:
            return
        seq_len = int(ids.shape[-1]) if ids.dim() else 1
        tokens = int(ids.numel())
        s = self.shape
        self._tokens += tokens
        self._flops += tokens * flops_per_token(s.matmul_params, s.layers, s.width, seq_len)

    def metrics(self, elapsed_s: float, world_size: int) -> dict[str, float]:
        """The step's ``tokens_per_s`` (all ranks; each holds the same shapes) and ``mfu``
        (a fraction, where the peak is known); resets the count."""
        tokens, flops = self._tokens * world_size, self._flops * world_size
        self._tokens, self._flops = 0, 0.0
        if tokens == 0 or elapsed_s <= 0:
            return {}
        out = {"tokens_per_s": tokens / elapsed_s}
        if self.peak:
            out["mfu"] = flops / elapsed_s / (self.peak * self.devices)
        return out
