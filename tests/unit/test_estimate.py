"""The memory estimator against published facts of real models (tests/data/hf_configs)."""

from __future__ import annotations

import pytest

from deployer.config.models_config import ModelConfig
from deployer.config.units import GIB
from deployer.planning.architecture import count_parameters, parse_architecture
from deployer.planning.estimate import (
    DEFAULT_OVERHEAD_GIB,
    CheckpointSize,
    EstimateError,
    estimate_memory,
    kv_cache_bytes_per_token,
)
from tests.hf_data import hf_config, hf_facts

pytestmark = pytest.mark.unit

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
LLAMA_70B = "meta-llama/Llama-3.1-70B-Instruct"
QWEN_7B = "Qwen/Qwen2.5-7B-Instruct"
MIXTRAL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
DEEPSEEK_V3 = "deepseek-ai/DeepSeek-V3"
DEEPSEEK_V2_LITE = "deepseek-ai/DeepSeek-V2-Lite"
QWEN3_MOE = "Qwen/Qwen3-30B-A3B"


def model(repo: str, **fields: object) -> ModelConfig:
    return ModelConfig.model_validate(
        {"model_id": repo.split("/")[1], "model_source": repo, **fields}
    )


PUBLISHED_BF16_CHECKPOINTS = [
    (repo, facts["safetensors_total_size"])
    for repo, facts in hf_facts().items()
    if facts.get("safetensors_total_size")
]


@pytest.mark.parametrize(("repo", "total_size"), PUBLISHED_BF16_CHECKPOINTS)
def test_parameter_count_matches_the_published_checkpoint(repo: str, total_size: int) -> None:
    # These checkpoints are bf16: 2 bytes per parameter, so the published index total_size
    # is twice the parameter count, to the byte (dense, GQA, MoE and MLA alike).
    assert count_parameters(parse_architecture(hf_config(repo))).total * 2 == total_size


@pytest.mark.parametrize(("repo", "total_size"), PUBLISHED_BF16_CHECKPOINTS)
def test_weights_without_a_checkpoint_come_from_the_parameter_count(
    repo: str, total_size: int
) -> None:
    estimate = estimate_memory(model(repo, max_model_len=4096), hf_config(repo))
    assert estimate.weights_bytes_per_gpu == total_size
    assert estimate.weights_from == "parameter count"


def test_published_parameter_counts_in_billions() -> None:
    for repo, facts in hf_facts().items():
        published = facts.get("published_params_b")
        if not published:
            continue
        count = count_parameters(parse_architecture(hf_config(repo))).total / 1e9
        # model cards round (8.03B, 46.7B, 671B) and DeepSeek-V2-Lite says "16B" for 15.7B
        assert count == pytest.approx(published, rel=0.02), repo


@pytest.mark.parametrize(
    ("repo", "tp", "kv_dtype", "expected"),
    [
        (LLAMA_8B, 1, "auto", 32 * 2 * 8 * 128 * 2),  # 128 KiB, dense GQA
        (LLAMA_8B, 2, "auto", 32 * 2 * 4 * 128 * 2),
        (LLAMA_70B, 4, "auto", 80 * 2 * 2 * 128 * 2),
        (LLAMA_70B, 8, "auto", 80 * 2 * 1 * 128 * 2),
        (LLAMA_70B, 8, "fp8", 80 * 2 * 1 * 128 * 1),  # fp8 KV cache halves it
        (QWEN_7B, 4, "auto", 28 * 2 * 1 * 128 * 2),  # 4 KV heads over 4 ranks
        (MIXTRAL, 2, "fp8_e4m3", 32 * 2 * 4 * 128 * 1),  # MoE: attention is dense
        (QWEN3_MOE, 1, "auto", 48 * 2 * 4 * 128 * 2),  # explicit head_dim 128, not 2048/32
        (DEEPSEEK_V3, 1, "auto", 61 * (512 + 64) * 2),  # MLA: one latent per layer
        (DEEPSEEK_V3, 8, "auto", 61 * (512 + 64) * 2),  # ... the same on every rank
        (DEEPSEEK_V3, 8, "fp8", 61 * (512 + 64) * 1),
        (DEEPSEEK_V2_LITE, 2, "auto", 27 * (512 + 64) * 2),
    ],
)
def test_kv_cache_bytes_per_token_per_gpu(repo: str, tp: int, kv_dtype: str, expected: int) -> None:
    arch = parse_architecture(hf_config(repo))
    config = model(repo, tensor_parallel_size=tp, kv_cache_dtype=kv_dtype)
    assert kv_cache_bytes_per_token(config, arch, tp) == expected


def test_kv_heads_are_replicated_when_tp_exceeds_them() -> None:
    # Llama 70B has 8 KV heads: at tp 16 each rank still holds one whole head.
    arch = parse_architecture(hf_config(LLAMA_70B))
    assert kv_cache_bytes_per_token(model(LLAMA_70B), arch, 16) == 80 * 2 * 1 * 128 * 2


def test_whole_estimate_for_llama_70b_at_tp_4() -> None:
    estimate = estimate_memory(
        model(LLAMA_70B, tensor_parallel_size=4, max_model_len=8192, max_num_seqs=16),
        hf_config(LLAMA_70B),
    )
    weights = 141107412992 // 4
    kv = 80 * 2 * 2 * 128 * 2 * 8192 * 16
    assert estimate.weights_bytes_per_gpu == weights
    assert estimate.kv_cache_tokens == 8192 * 16
    assert estimate.kv_cache_bytes_per_gpu == kv
    assert estimate.overhead_bytes_per_gpu == DEFAULT_OVERHEAD_GIB * GIB
    assert estimate.total_bytes_per_gpu == weights + kv + DEFAULT_OVERHEAD_GIB * GIB
    document = estimate.as_json()
    assert set(document) >= {
        "model_id",
        "weights_gib_per_gpu",
        "kv_cache_bytes_per_token_per_gpu",
        "kv_cache_gib_per_gpu",
        "overhead_gib_per_gpu",
        "total_gib_per_gpu",
    }
    assert document["kv_cache_gib_per_gpu"] == 10.0  # 80 KiB per token x 128 Ki tokens
    # suggestions for other sizes: tp 8 halves the weights and KV per GPU
    assert estimate.total_bytes_per_gpu_by_tp[8] < estimate.total_bytes_per_gpu


def test_kv_cache_is_booked_in_whole_blocks_for_one_sequence_by_default() -> None:
    estimate = estimate_memory(model(LLAMA_8B, max_model_len=1000), hf_config(LLAMA_8B))
    assert estimate.kv_cache_tokens == 1008  # 63 blocks of 16
    default_len = estimate_memory(model(LLAMA_8B), hf_config(LLAMA_8B))
    assert default_len.max_model_len == 131072
    assert default_len.kv_cache_bytes_per_gpu == 131072 * 131072  # 16 GiB for one full sequence


def test_overhead_is_overridable_per_model() -> None:
    estimate = estimate_memory(
        model(LLAMA_8B, max_model_len=1024, overhead_gib=0.5), hf_config(LLAMA_8B)
    )
    assert estimate.overhead_bytes_per_gpu == GIB // 2


def test_fp8_checkpoint_of_deepseek_v3_is_sized_in_one_byte_weights() -> None:
    estimate = estimate_memory(
        model(DEEPSEEK_V3, tensor_parallel_size=8, max_model_len=4096), hf_config(DEEPSEEK_V3)
    )
    total = (estimate.weights_bytes_per_gpu or 0) * 8
    # The published FP8 checkpoint files hold 688.6 GB, including the 14B-parameter
    # multi-token-prediction layer vLLM does not load without speculative decoding.
    assert 0.95 * 688_586_727_753 < total < 688_586_727_753


def test_online_quantization_shrinks_a_16_bit_checkpoint() -> None:
    bf16 = estimate_memory(model(LLAMA_8B, max_model_len=1024), hf_config(LLAMA_8B))
    fp8 = estimate_memory(
        model(LLAMA_8B, max_model_len=1024, quantization="fp8"), hf_config(LLAMA_8B)
    )
    awq = estimate_memory(
        model(LLAMA_8B, max_model_len=1024, quantization="awq"), hf_config(LLAMA_8B)
    )
    assert bf16.weights_bytes_per_gpu
    assert fp8.weights_bytes_per_gpu
    assert awq.weights_bytes_per_gpu
    # embeddings and lm_head (2 x 128256 x 4096 params) stay in 16 bits
    embeddings = 2 * 128256 * 4096
    linear = 8030261248 - embeddings - (32 * 2 + 1) * 4096
    assert fp8.weights_bytes_per_gpu == linear + (8030261248 - linear) * 2
    assert awq.weights_bytes_per_gpu < fp8.weights_bytes_per_gpu < bf16.weights_bytes_per_gpu


def test_checkpoint_sizes_are_converted_to_the_serving_dtype() -> None:
    checkpoint = CheckpointSize({"F32": 4_000_000, "I64": 800}, source="safetensors headers")
    bf16 = estimate_memory(model(LLAMA_8B, max_model_len=16), hf_config(LLAMA_8B), checkpoint)
    fp32 = estimate_memory(
        model(LLAMA_8B, max_model_len=16, dtype="float32"), hf_config(LLAMA_8B), checkpoint
    )
    assert bf16.weights_bytes_per_gpu == 2_000_000 + 800
    assert fp32.weights_bytes_per_gpu == 4_000_000 + 800
    assert bf16.weights_from == "safetensors headers"


def test_given_footprint_skips_estimation() -> None:
    estimate = estimate_memory(model(LLAMA_8B, gpu_memory_gib=21.5), None)
    assert estimate.total_bytes_per_gpu == 21.5 * GIB
    assert estimate.weights_bytes_per_gpu is None
    assert estimate.as_json()["total_gib_per_gpu"] == 21.5


@pytest.mark.parametrize(
    ("repo", "fields", "message"),
    [
        (QWEN_7B, {"tensor_parallel_size": 8}, "must divide num_attention_heads (28)"),
        (LLAMA_8B, {"tensor_parallel_size": 3}, "must divide num_attention_heads (32)"),
        (LLAMA_8B, {"max_model_len": 200_000}, "exceeds the model's maximum (131072"),
        (LLAMA_8B, {"quantization": "mystery"}, "quantization 'mystery' is not known"),
    ],
)
def test_impossible_settings_are_explained(
    repo: str, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(EstimateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        estimate_memory(model(repo, **fields), hf_config(repo))


def test_missing_config_suggests_gpu_memory_gib() -> None:
    with pytest.raises(EstimateError, match="set gpu_memory_gib"):
        estimate_memory(model(LLAMA_8B), None)
