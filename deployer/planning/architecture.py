"""What a model's `config.json` says about its memory: layers, heads, experts, parameters.

Pure: a config.json mapping in, an `Architecture` out. Field names follow Hugging Face
transformers (Llama, Qwen2/3, Mistral/Mixtral, DeepSeek V2/V3 and their kin). Every number read
is checked against bounds that make physical sense (`_LIMITS`): a config.json with 10^10 layers
or -80 of them is refused with the key named, never estimated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from deployer.errors import shown

# config.json keys that bound the context length, as vLLM reads them
# (vllm/config/model.py, _get_and_verify_max_len).
_MAX_LEN_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# Rope scalings that vLLM does not multiply into the maximum length.
_ROPE_TYPES_NOT_SCALING_LEN = {"su", "longrope", "llama3", "mrope", "default"}
_MAX_LEN = 2**32
# Inclusive bounds of the integers read from config.json, by key (default: 0 to 2^20).
_LIMITS: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, 4096),
    "n_layer": (1, 4096),
    "num_layers": (1, 4096),
    "num_attention_heads": (1, 65_536),
    "n_head": (1, 65_536),
    "num_key_value_heads": (1, 65_536),
    "num_kv_heads": (1, 65_536),
    "n_head_kv": (1, 65_536),
    "hidden_size": (1, 2**20),
    "n_embd": (1, 2**20),
    "d_model": (1, 2**20),
    "vocab_size": (1, 2**26),
    "original_max_position_embeddings": (1, _MAX_LEN),
    "first_k_dense_replace": (0, 4096),
    "moe_layer_freq": (1, 4096),
    "decoder_sparse_step": (1, 4096),
    "n_routed_experts": (0, 65_536),
    "num_local_experts": (0, 65_536),
    "num_experts": (0, 65_536),
    "n_shared_experts": (0, 65_536),
    **dict.fromkeys(
        (
            "intermediate_size",
            "n_inner",
            "ffn_dim",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
        ),
        (0, 2**24),
    ),
}
_DEFAULT_LIMITS = (0, 2**20)
_MAX_ROPE_FACTOR = 1024.0
# Model families whose MLP is not gated (two matrices, not three).
_UNGATED_MLP_TYPES = {"gpt2", "gpt_neox", "gptj", "opt", "falcon", "phi", "bloom", "starcoder2"}


class ArchitectureError(ValueError):
    """config.json lacks something the estimator needs; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The parts of config.json that decide weights and KV cache size."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    tie_word_embeddings: bool
    torch_dtype: str | None
    max_model_len: int | None
    gated_mlp: bool = True
    attention_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on queries and keys (Qwen3)
    # Multi-head latent attention (DeepSeek V2/V3): set when kv_lora_rank is.
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    # Mixture of experts: zero experts means dense.
    num_experts: int = 0
    moe_intermediate_size: int = 0
    shared_experts_intermediate_size: int = 0
    num_moe_layers: int = 0
    quant_method: str | None = None
    quant_bits: float | None = None

    @property
    def is_mla(self) -> bool:
        """Whether attention is DeepSeek's multi-head latent attention."""
        return self.kv_lora_rank is not None


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    """Parameters split by how quantization treats them."""

    linear: int  # attention, MLP and expert matrices: what weight quantization shrinks
    other: int  # embeddings, lm_head, norms, biases, routers: kept in the model dtype

    @property
    def total(self) -> int:
        """All parameters."""
        return self.linear + self.other


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Multimodal configs nest the language model under text_config; merge it over the top."""
    text = config.get("text_config")
    if isinstance(text, Mapping):
        merged = dict(config)
        merged.update(text)
        return merged
    return config


def _bounded(key: str, value: int) -> int:
    low, high = _LIMITS.get(key, _DEFAULT_LIMITS)
    if not low <= value <= high:
        raise ArchitectureError(
            f"config.json's {key} is {shown(value)}, outside {low} to {high:,}; the file is "
            "damaged or not a model's config"
        )
    return value


def _int(config: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    """The first of `keys` that holds an integer, within its bounds (`_LIMITS`)."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return _bounded(key, value)
    if default is not None:
        return default
    raise ArchitectureError(f"config.json has no integer {' or '.join(keys)}")


def derived_max_model_len(config: Mapping[str, Any]) -> int | None:
    """The longest context vLLM accepts for this config (before any override)."""
    config = _text_config(config)
    lengths = [
        config[k]
        for k in _MAX_LEN_KEYS
        if isinstance(config.get(k), int) and not isinstance(config[k], bool) and config[k] > 0
    ]
    if not lengths:
        return None
    length = min(lengths)
    if length > _MAX_LEN:
        raise ArchitectureError(
            f"config.json's maximum context length {shown(length)} is beyond {_MAX_LEN:,} tokens"
        )
    rope = config.get("rope_scaling")
    if isinstance(rope, Mapping):
        kind = rope.get("rope_type", rope.get("type"))
        factor = rope.get("factor")
        if (
            kind not in _ROPE_TYPES_NOT_SCALING_LEN
            and isinstance(factor, int | float)
            and not isinstance(factor, bool)
        ):
            if not (math.isfinite(factor) and 0 < factor <= _MAX_ROPE_FACTOR):
                raise ArchitectureError(
                    f"config.json's rope_scaling.factor is {shown(factor)}, not a number "
                    f"above 0 and at most {_MAX_ROPE_FACTOR:g}"
                )
            if "original_max_position_embeddings" in rope:
                length = _int(rope, "original_max_position_embeddings")
            length = int(length * factor)
    return int(length)


def _quantization(config: Mapping[str, Any]) -> tuple[str | None, float | None]:
    quant = config.get("quantization_config")
    if not isinstance(quant, Mapping):
        return None, None
    method = quant.get("quant_method")
    bits = quant.get("bits", quant.get("w_bit"))
    if not isinstance(bits, int | float) or isinstance(bits, bool):
        bits = None
    elif not (math.isfinite(bits) and 1 <= bits <= 64):
        raise ArchitectureError(
            f"config.json's quantization_config bits is {shown(bits)}, not 1 to 64"
        )
    return (
        str(method)[:100] if method is not None else None,
        float(bits) if bits is not None else None,
    )


def _moe(
    config: Mapping[str, Any], num_layers: int, intermediate: int
) -> tuple[int, int, int, int]:
    """(experts, expert intermediate size, shared-expert intermediate size, MoE layers)."""
    experts = _int(config, "n_routed_experts", "num_local_experts", "num_experts", default=0)
    if experts <= 0:
        return 0, 0, 0, 0
    expert_inter = _int(config, "moe_intermediate_size", default=intermediate)
    shared = _int(config, "n_shared_experts", default=0) * expert_inter
    shared += _int(config, "shared_expert_intermediate_size", default=0)
    if "first_k_dense_replace" in config:  # DeepSeek: dense first layers, then every freq-th
        first = _int(config, "first_k_dense_replace", default=0)
        freq = max(1, _int(config, "moe_layer_freq", default=1))
        moe_layers = sum(1 for i in range(first, num_layers) if i % freq == 0)
    elif "decoder_sparse_step" in config or "mlp_only_layers" in config:  # Qwen MoE
        step = max(1, _int(config, "decoder_sparse_step", default=1))
        dense_only = config.get("mlp_only_layers") or []
        if not isinstance(dense_only, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in dense_only
        ):
            raise ArchitectureError("config.json's mlp_only_layers is not a list of integers")
        dense = set(dense_only)
        moe_layers = sum(1 for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    else:  # Mixtral and kin: every layer
        moe_layers = num_layers
    return experts, expert_inter, shared, moe_layers


def parse_architecture(config: Mapping[str, Any]) -> Architecture:
    """Read the memory-relevant facts from a config.json mapping."""
    config = _text_config(config)
    num_layers = _int(config, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _int(config, "hidden_size", "n_embd", "d_model")
    heads = _int(config, "num_attention_heads", "n_head")
    kv_heads = _int(config, "num_key_value_heads", "num_kv_heads", "n_head_kv", default=heads)
    if heads <= 0 or kv_heads <= 0:
        raise ArchitectureError("config.json has no positive num_attention_heads")
    head_dim = config.get("head_dim")
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0:
        head_dim = max(1, hidden // heads)
    head_dim = _bounded("head_dim", head_dim)
    intermediate = _int(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    experts, expert_inter, shared_inter, moe_layers = _moe(config, num_layers, intermediate)
    quant_method, quant_bits = _quantization(config)
    dtype = config.get("torch_dtype", config.get("dtype"))
    kv_lora_rank = _int(config, "kv_lora_rank", default=0)
    is_mla = kv_lora_rank > 0
    model_type = str(config.get("model_type", "unknown"))[:100]
    return Architecture(
        model_type=model_type,
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=_int(config, "vocab_size"),
        intermediate_size=intermediate,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        torch_dtype=str(dtype)[:100] if dtype is not None else None,
        max_model_len=derived_max_model_len(config),
        gated_mlp=model_type not in _UNGATED_MLP_TYPES,
        attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type.startswith("qwen3"),
        kv_lora_rank=kv_lora_rank if is_mla else None,
        q_lora_rank=(_int(config, "q_lora_rank", default=0) or None) if is_mla else None,
        qk_rope_head_dim=_int(config, "qk_rope_head_dim", default=0) if is_mla else 0,
        qk_nope_head_dim=_int(config, "qk_nope_head_dim", default=0) if is_mla else 0,
        v_head_dim=_int(config, "v_head_dim", default=head_dim) if is_mla else head_dim,
        num_experts=experts,
        moe_intermediate_size=expert_inter,
        shared_experts_intermediate_size=shared_inter,
        num_moe_layers=moe_layers,
        quant_method=quant_method,
        quant_bits=quant_bits,
    )


def _attention_parameters(arch: Architecture) -> tuple[int, int]:
    """(linear, other) parameters of one attention block."""
    hidden, heads = arch.hidden_size, arch.num_attention_heads
    if arch.is_mla:
        assert arch.kv_lora_rank is not None
        qk_head = arch.qk_nope_head_dim + arch.qk_rope_head_dim
        if arch.q_lora_rank:
            q = hidden * arch.q_lora_rank + arch.q_lora_rank * heads * qk_head
            norms = arch.q_lora_rank
        else:
            q, norms = hidden * heads * qk_head, 0
        kv_a = hidden * (arch.kv_lora_rank + arch.qk_rope_head_dim)
        kv_b = arch.kv_lora_rank * heads * (arch.qk_nope_head_dim + arch.v_head_dim)
        out = heads * arch.v_head_dim * hidden
        return q + kv_a + kv_b + out, norms + arch.kv_lora_rank
    q_width = heads * arch.head_dim
    kv_width = arch.num_kv_heads * arch.head_dim
    linear = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    bias = q_width + 2 * kv_width if arch.attention_bias else 0
    qk_norm = 2 * arch.head_dim if arch.qk_norm else 0
    return linear, bias + qk_norm


def count_parameters(arch: Architecture) -> ParameterCount:
    """Parameters the inference engine loads (all experts, no multi-token-prediction layers)."""
    hidden = arch.hidden_size
    matrices = 3 if arch.gated_mlp else 2
    attn_linear, attn_other = _attention_parameters(arch)
    dense_mlp = matrices * hidden * arch.intermediate_size
    moe_mlp = (
        matrices
        * hidden
        * (arch.num_experts * arch.moe_intermediate_size + arch.shared_experts_intermediate_size)
    )
    router = hidden * arch.num_experts
    dense_layers = arch.num_layers - arch.num_moe_layers
    linear = (
        arch.num_layers * attn_linear + dense_layers * dense_mlp + arch.num_moe_layers * moe_mlp
    )
    norms = arch.num_layers * 2 * hidden + hidden
    embeddings = arch.vocab_size * hidden * (1 if arch.tie_word_embeddings else 2)
    other = embeddings + norms + arch.num_layers * attn_other + arch.num_moe_layers * router
    return ParameterCount(linear=linear, other=other)
