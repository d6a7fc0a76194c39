"""What a model's `config.json` says about its memory: layers, heads, experts, parameters.

Pure: a config.json mapping in, an `Architecture` out. Field names follow Hugging Face
transformers (Llama, Qwen2/3, Mistral/Mixtral, DeepSeek V2/V3 and their kin).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

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


def _int(config: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if default is not None:
        return default
    raise ArchitectureError(f"config.json has no integer {' or '.join(keys)}")


def derived_max_model_len(config: Mapping[str, Any]) -> int | None:
    """The longest context vLLM accepts for this config (before any override)."""
    config = _text_config(config)
    lengths = [config[k] for k in _MAX_LEN_KEYS if isinstance(config.get(k), int) and config[k] > 0]
    if not lengths:
        return None
    length = int(min(lengths))
    rope = config.get("rope_scaling")
    if isinstance(rope, Mapping):
        kind = rope.get("rope_type", rope.get("type"))
        factor = rope.get("factor")
        if kind not in _ROPE_TYPES_NOT_SCALING_LEN and isinstance(factor, int | float):
            if "original_max_position_embeddings" in rope:
                length = int(rope["original_max_position_embeddings"])
            length = int(length * factor)
    return length


def _quantization(config: Mapping[str, Any]) -> tuple[str | None, float | None]:
    quant = config.get("quantization_config")
    if not isinstance(quant, Mapping):
        return None, None
    method = quant.get("quant_method")
    bits = quant.get("bits", quant.get("w_bit"))
    return (
        str(method) if method is not None else None,
        float(bits) if isinstance(bits, int | float) else None,
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
        dense_only = set(config.get("mlp_only_layers") or [])
        moe_layers = sum(
            1 for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0
        )
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
    if not isinstance(head_dim, int) or head_dim <= 0:
        head_dim = hidden // heads
    intermediate = _int(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    experts, expert_inter, shared_inter, moe_layers = _moe(config, num_layers, intermediate)
    quant_method, quant_bits = _quantization(config)
    dtype = config.get("torch_dtype", config.get("dtype"))
    kv_lora_rank = config.get("kv_lora_rank")
    is_mla = isinstance(kv_lora_rank, int) and kv_lora_rank > 0
    model_type = str(config.get("model_type", "unknown"))
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
        torch_dtype=str(dtype) if dtype is not None else None,
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
