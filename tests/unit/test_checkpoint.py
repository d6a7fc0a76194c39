"""Reading config.json and tensor sizes from real checkpoint files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from deployer.config.models_config import ModelConfig
from deployer.planning.estimate import EstimateError, estimate_memory
from deployer.sources.checkpoint import (
    local_checkpoint_size,
    read_model_files,
    safetensors_header_sizes,
)
from tests.hf_data import hf_config

pytestmark = pytest.mark.unit

TINY_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "torch_dtype": "float32",
    "tie_word_embeddings": False,
}


def write_checkpoint(directory: Path, shards: int = 2) -> int:
    """A real safetensors checkpoint of float32 tensors; returns the stored tensor bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY_CONFIG))
    stored = 0
    for shard in range(shards):
        tensors = {
            f"layer{shard}.weight": np.zeros((64, 128), dtype=np.float32),
            f"layer{shard}.position_ids": np.zeros((512,), dtype=np.int64),
        }
        save_file(tensors, str(directory / f"model-{shard:05d}-of-{shards:05d}.safetensors"))
        stored += sum(t.nbytes for t in tensors.values())
    return stored


def test_safetensors_headers_give_bytes_per_dtype(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "m", shards=1)
    (shard,) = (tmp_path / "m").glob("*.safetensors")
    assert safetensors_header_sizes(shard) == {"F32": 64 * 128 * 4, "I64": 512 * 8}


def test_local_directory_weights_are_converted_to_the_serving_dtype(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "m")
    config, size = read_model_files(str(tmp_path / "m"))
    assert config["hidden_size"] == 64
    assert size is not None
    assert size.source == "safetensors headers"
    model = ModelConfig(model_id="tiny", model_source=str(tmp_path / "m"))
    estimate = estimate_memory(model, config, size)
    # float32 weights are served in 16 bits ("auto" dtype); integer buffers stay as they are
    assert estimate.weights_bytes_per_gpu == 2 * (64 * 128 * 2) + 2 * (512 * 8)
    assert estimate.weights_from == "safetensors headers"


def test_index_total_size_is_used_when_shards_are_absent(tmp_path: Path) -> None:
    directory = tmp_path / "llama"
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps(hf_config("meta-llama/Llama-3.1-8B-Instruct"))
    )
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 16060522496}, "weight_map": {}})
    )
    size = local_checkpoint_size(directory)
    assert size is not None
    assert size.bytes_by_dtype == {"?": 16060522496}
    config, size = read_model_files(str(directory))
    model = ModelConfig(
        model_id="llama", model_source=str(directory), tensor_parallel_size=2, max_model_len=1024
    )
    assert estimate_memory(model, config, size).weights_bytes_per_gpu == 16060522496 // 2


def test_directory_without_config_json_is_explained(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(EstimateError, match=r"no config\.json in .*empty; set gpu_memory_gib"):
        read_model_files(str(tmp_path / "empty"))
    with pytest.raises(EstimateError, match="is not a directory"):
        read_model_files(str(tmp_path / "missing"))


@pytest.mark.usefixtures("offline_hub")
def test_unreachable_hub_is_explained() -> None:
    with pytest.raises(EstimateError) as error:
        read_model_files("some-org/some-model")
    message = str(error.value)
    assert "'some-org/some-model' is not a local directory" in message
    assert "not in the local Hugging Face cache while HF_HUB_OFFLINE is set" in message
    assert "set gpu_memory_gib" in message
