"""Small models of real architectures with random weights, built locally (no model hub).

The config.json of each is the published one's shape (layers, heads, sizes, vocabulary, tied
embeddings), the tensors are the ones transformers names for that architecture, in bfloat16,
filled from a seeded random block, and the tokenizer is the tiny models' local one
(tools/tiny_models.py; its ids fit in any vocabulary). vLLM loads and serves them like the
real checkpoints, so memory measured on a GPU compares with what rackserve estimates for the
real models. Needs torch, transformers and safetensors; built once into a cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# The published config.json shapes (Hugging Face, as of 2026): Qwen/Qwen2.5-0.5B-Instruct and
# meta-llama/Llama-3.2-1B-Instruct; 494 M and 1,236 M parameters.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rms_norm_eps": 1e-05,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    },
}
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "rackserve-tiny.json"}
STAMP = "rackserve-real-shape.json"
RANDOM_BLOCK = 1 << 24  # elements drawn once; tensors are filled from it at seeded offsets


def _tokenizer(cache: Path) -> tuple[Path, dict[str, Any]]:
    """The tiny models' tokenizer directory and its special token ids."""
    from tools.tiny_models import build_tiny_model  # noqa: PLC0415 - needs torch

    tiny = build_tiny_model(cache / "tokenizer-source")
    config = json.loads((tiny / "config.json").read_text())
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return tiny, ids


def _random_tensors(config: Any, seed: int) -> dict[str, Any]:
    """Every parameter transformers creates for the config (tied ones once), in bfloat16."""
    import torch
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    block = torch.randn(RANDOM_BLOCK, generator=generator).mul_(0.02).to(torch.bfloat16)
    tensors = {}
    for name, parameter in model.named_parameters():  # tied parameters are listed once
        count = parameter.numel()
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(parameter.shape, dtype=torch.bfloat16)
            continue
        start = int(torch.randint(RANDOM_BLOCK, (1,), generator=generator))
        repeats = -(-(start + count) // RANDOM_BLOCK)
        flat = (
            block.repeat(repeats)[start : start + count] if repeats > 1 else block[start:][:count]
        )
        tensors[name] = flat.clone().reshape(parameter.shape)
    return tensors


def build_real_shape(shape: str, cache: Path, seed: int = 0) -> Path:
    """A checkpoint directory of `shape` (a key of SHAPES) with random weights, built once."""
    directory = cache / shape
    wanted = {"shape": SHAPES[shape], "seed": seed}
    stamp = directory / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return directory
    from safetensors.torch import save_file  # noqa: PLC0415
    from transformers import AutoConfig  # noqa: PLC0415

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    tokenizer, ids = _tokenizer(cache)
    for path in tokenizer.iterdir():  # tokenizer files, chat template (names vary by version)
        if path.is_file() and path.name not in MODEL_FILES:
            shutil.copy(path, directory / path.name)
    settings = dict(SHAPES[shape])
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = settings["max_position_embeddings"]
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    config = AutoConfig.for_model(settings.pop("model_type"), **settings, **ids)
    setattr(config, "dtype" if "dtype" in config.to_dict() else "torch_dtype", "bfloat16")
    config.save_pretrained(directory)
    save_file(_random_tensors(config, seed), directory / "model.safetensors", {"format": "pt"})
    stamp.write_text(json.dumps(wanted))
    return directory
