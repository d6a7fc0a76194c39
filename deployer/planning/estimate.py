"""Per-GPU memory of a model served by vLLM: weights, KV cache and engine overhead.

Pure: a `ModelConfig`, the model's config.json and what is known of its checkpoint go in; a
`MemoryEstimate` comes out. The accounting follows vLLM's v1 engine (0.29-0.33):

- weights: the checkpoint's tensors at the dtype vLLM loads them in, split over the
  tensor-parallel ranks (all MoE experts stay resident);
- KV cache per token per GPU: layers x 2 (K and V) x max(1, kv_heads // tp) x head_dim x bytes
  (vllm/v1/kv_cache_interface.py); MLA models hold one latent of kv_lora_rank +
  qk_rope_head_dim per layer, the same on every rank;
- KV booked: `max_num_seqs` sequences of `max_model_len` tokens each (one sequence, the least
  vLLM starts with, when max_num_seqs is not set), in whole blocks of 16 tokens;
- overhead: activation peak, CUDA graphs and the CUDA context, a documented default per GPU that
  a model's `overhead_gib` overrides.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from deployer.config.models_config import ModelConfig
from deployer.config.units import GIB
from deployer.planning.architecture import (
    Architecture,
    ArchitectureError,
    count_parameters,
    parse_architecture,
)

DEFAULT_OVERHEAD_GIB = 2.0
"""Per-GPU overhead when a model sets no `overhead_gib`: ~1.25 GiB activation peak and CUDA
graphs at vLLM's default max_num_batched_tokens, plus ~0.75 GiB CUDA context."""

CUDA_CONTEXT_GIB = 0.75
"""Part of the overhead that each engine process allocates outside gpu_memory_utilization."""

KV_BLOCK_TOKENS = 16
"""vLLM's default KV block size; KV is allocated in whole blocks."""

TENSOR_PARALLEL_CHOICES = (1, 2, 4, 8, 16)
"""Sizes tried when suggesting another tensor_parallel_size."""

_DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
}
# safetensors dtype tags → bytes per element
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}
_TORCH_TO_TAG = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

# Bits per weight of quantized linear layers, by vLLM quantization method, when the
# checkpoint's quantization_config does not say.
_QUANT_BITS = {
    "fp8": 8.0,
    "fbgemm_fp8": 8.0,
    "modelopt": 8.0,
    "compressed-tensors": 8.0,
    "int8": 8.0,
    "experts_int8": 8.0,
    "awq": 4.0,
    "awq_marlin": 4.0,
    "gptq": 4.0,
    "gptq_marlin": 4.0,
    "marlin": 4.0,
    "bitsandbytes": 4.0,
    "mxfp4": 4.25,  # 4-bit values plus one 8-bit scale per 32
    "modelopt_fp4": 4.5,  # 4-bit values plus one fp8 scale per 16
}
_GROUP_QUANT_OVERHEAD_BITS = 0.25  # fp16 scale + zero point per group of 128 weights


class EstimateError(ValueError):
    """The model cannot be estimated as configured; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class CheckpointSize:
    """Bytes of the checkpoint's tensors, by safetensors dtype tag ("?" when unknown)."""

    bytes_by_dtype: Mapping[str, int]
    source: str  # e.g. "model.safetensors.index.json", "safetensors headers"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """One model's memory on each of its GPUs (each tensor-parallel rank), in bytes."""

    model_id: str
    tensor_parallel_size: int
    total_bytes_per_gpu: int
    weights_bytes_per_gpu: int | None
    kv_cache_bytes_per_token_per_gpu: int | None
    kv_cache_tokens: int | None
    kv_cache_bytes_per_gpu: int | None
    overhead_bytes_per_gpu: int | None
    weights_from: str
    max_model_len: int | None
    total_bytes_per_gpu_by_tp: Mapping[int, int]
    """Footprint at other valid tensor-parallel sizes, for suggestions when a model won't fit."""

    def as_json(self) -> dict[str, Any]:
        """The estimate as `rackserve estimate --json` writes it (GiB rounded to 3 places)."""

        def gib(value: int | None) -> float | None:
            return None if value is None else round(value / GIB, 3)

        return {
            "model_id": self.model_id,
            "tensor_parallel_size": self.tensor_parallel_size,
            "weights_gib_per_gpu": gib(self.weights_bytes_per_gpu),
            "kv_cache_bytes_per_token_per_gpu": self.kv_cache_bytes_per_token_per_gpu,
            "kv_cache_tokens": self.kv_cache_tokens,
            "kv_cache_gib_per_gpu": gib(self.kv_cache_bytes_per_gpu),
            "overhead_gib_per_gpu": gib(self.overhead_bytes_per_gpu),
            "total_gib_per_gpu": gib(self.total_bytes_per_gpu),
            "weights_from": self.weights_from,
            "max_model_len": self.max_model_len,
        }


def model_dtype_bytes(model: ModelConfig) -> int:
    """Bytes per element of the dtype vLLM runs the model in."""
    if model.dtype != "auto":
        return _DTYPE_BYTES[model.dtype]
    # vLLM's "auto" takes the checkpoint's dtype but runs float32 checkpoints in 16 bits.
    return 2


def kv_dtype_bytes(model: ModelConfig) -> int:
    """Bytes per KV cache element."""
    if model.kv_cache_dtype.startswith("fp8"):
        return 1
    if model.kv_cache_dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[model.kv_cache_dtype]
    return model_dtype_bytes(model)


def kv_cache_bytes_per_token(model: ModelConfig, arch: Architecture, tp: int) -> int:
    """KV cache bytes one token takes on one GPU (one tensor-parallel rank)."""
    element = kv_dtype_bytes(model)
    if arch.is_mla:
        assert arch.kv_lora_rank is not None
        return arch.num_layers * (arch.kv_lora_rank + arch.qk_rope_head_dim) * element
    kv_heads_per_rank = max(1, arch.num_kv_heads // tp)
    return arch.num_layers * 2 * kv_heads_per_rank * arch.head_dim * element


def check_tensor_parallel(arch: Architecture, tp: int) -> str | None:
    """Why vLLM would reject this tensor_parallel_size for the model, or None if it accepts it."""
    heads, kv = arch.num_attention_heads, arch.num_kv_heads
    if heads % tp:
        return f"must divide num_attention_heads ({heads}) of the model; got {tp}"
    if not arch.is_mla and kv >= tp and kv % tp:
        return f"must divide num_key_value_heads ({kv}) of the model; got {tp}"
    if not arch.is_mla and kv < tp and tp % kv:
        return f"must be a multiple of num_key_value_heads ({kv}) when larger; got {tp}"
    return None


def _quant_bits(model: ModelConfig, arch: Architecture) -> float | None:
    """Bits per weight of linear layers, or None for an unquantized model."""
    method = model.quantization or arch.quant_method
    if method is None:
        return None
    if arch.quant_bits is not None and (model.quantization in {None, arch.quant_method}):
        bits = arch.quant_bits
        return bits + _GROUP_QUANT_OVERHEAD_BITS if bits < 8 else bits
    if method not in _QUANT_BITS:
        known = ", ".join(sorted(_QUANT_BITS))
        raise EstimateError(
            f"quantization {method!r} is not known to the estimator (known: {known}); "
            "set gpu_memory_gib to give the footprint by hand"
        )
    bits = _QUANT_BITS[method]
    return bits + _GROUP_QUANT_OVERHEAD_BITS if bits == 4.0 else bits


def weights_bytes(
    model: ModelConfig, arch: Architecture, checkpoint: CheckpointSize | None
) -> tuple[int, str]:
    """Total weight bytes vLLM loads (all ranks together), and where the figure came from."""
    dtype_bytes = model_dtype_bytes(model)
    quantized = (model.quantization or arch.quant_method) is not None
    if checkpoint is not None and (model.quantization is None or arch.quant_method is not None):
        total = 0
        for stored_tag, size in checkpoint.bytes_by_dtype.items():
            tag = stored_tag
            if tag == "?":  # only the total is known: it is in the config's torch_dtype
                tag = _TORCH_TO_TAG.get(arch.torch_dtype or "", "BF16")
            if tag in _FLOAT_TAGS and not quantized:
                # Unquantized floats are loaded in the serving dtype, whatever they are stored in.
                total += size // SAFETENSORS_DTYPE_BYTES[tag] * dtype_bytes
            else:
                total += size
        return total, checkpoint.source
    params = count_parameters(arch)
    bits = _quant_bits(model, arch)
    if bits is None:
        return params.total * dtype_bytes, "parameter count"
    return math.ceil(params.linear * bits / 8) + params.other * dtype_bytes, "parameter count"


def resolve_max_model_len(model: ModelConfig, arch: Architecture) -> int:
    """The context length vLLM will use: the model's setting, else the config's maximum."""
    if model.max_model_len is not None:
        if arch.max_model_len is not None and model.max_model_len > arch.max_model_len:
            raise EstimateError(
                f"max_model_len {model.max_model_len} exceeds the model's maximum "
                f"({arch.max_model_len}, from config.json); lower it"
            )
        return model.max_model_len
    if arch.max_model_len is None:
        raise EstimateError("config.json gives no maximum context length; set max_model_len")
    return arch.max_model_len


def _overhead_bytes(model: ModelConfig) -> int:
    gib = DEFAULT_OVERHEAD_GIB if model.overhead_gib is None else model.overhead_gib
    return round(gib * GIB)


def estimate_memory(
    model: ModelConfig,
    hf_config: Mapping[str, Any] | None,
    checkpoint: CheckpointSize | None = None,
) -> MemoryEstimate:
    """Estimate a model's per-GPU memory, or take it from `gpu_memory_gib` when given.

    Raises EstimateError naming what to change when the model cannot be estimated.
    """
    tp = model.tensor_parallel_size
    if model.gpu_memory_gib is not None:
        given = round(model.gpu_memory_gib * GIB)
        return MemoryEstimate(
            model_id=model.model_id,
            tensor_parallel_size=tp,
            total_bytes_per_gpu=given,
            weights_bytes_per_gpu=None,
            kv_cache_bytes_per_token_per_gpu=None,
            kv_cache_tokens=None,
            kv_cache_bytes_per_gpu=None,
            overhead_bytes_per_gpu=None,
            weights_from="given",
            max_model_len=model.max_model_len,
            total_bytes_per_gpu_by_tp={tp: given},
        )
    if hf_config is None:
        raise EstimateError(
            f"no config.json for {model.source!r}; set gpu_memory_gib to give the footprint"
        )
    try:
        arch = parse_architecture(hf_config)
    except ArchitectureError as exc:
        raise EstimateError(f"{exc}; set gpu_memory_gib to give the footprint by hand") from None
    problem = check_tensor_parallel(arch, tp)
    if problem:
        raise EstimateError(f"tensor_parallel_size {problem}")
    max_len = resolve_max_model_len(model, arch)
    weights_total, weights_from = weights_bytes(model, arch, checkpoint)
    seqs = model.max_num_seqs or 1
    kv_tokens = math.ceil(seqs * max_len / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
    overhead = _overhead_bytes(model)

    def footprint(size: int) -> tuple[int, int, int]:
        per_token = kv_cache_bytes_per_token(model, arch, size)
        weights = math.ceil(weights_total / size)
        return weights, per_token, weights + per_token * kv_tokens + overhead

    by_tp = {
        size: footprint(size)[2]
        for size in sorted({tp, *TENSOR_PARALLEL_CHOICES})
        if check_tensor_parallel(arch, size) is None
    }
    weights, per_token, total = footprint(tp)
    if weights <= 0 or per_token <= 0:
        raise EstimateError(
            "config.json and the checkpoint give no weights or no KV cache; "
            "set gpu_memory_gib to give the footprint by hand"
        )
    return MemoryEstimate(
        model_id=model.model_id,
        tensor_parallel_size=tp,
        total_bytes_per_gpu=total,
        weights_bytes_per_gpu=weights,
        kv_cache_bytes_per_token_per_gpu=per_token,
        kv_cache_tokens=kv_tokens,
        kv_cache_bytes_per_gpu=per_token * kv_tokens,
        overhead_bytes_per_gpu=overhead,
        weights_from=weights_from,
        max_model_len=max_len,
        total_bytes_per_gpu_by_tp=by_tp,
    )
