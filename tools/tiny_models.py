"""Tiny Llama-style models built locally, for the quickstart, the tests and the benchmarks.

Random weights and a byte-level BPE tokenizer trained on this machine's Python standard library
sources, with a chat template: a real checkpoint directory that vLLM's CPU build serves, built in
about a second with no model hub. Needs torch, transformers and tokenizers (the `cpu` extra).
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>", "<|end|>"]

# Sizes that vLLM's CPU backend accepts (head size 32 and up); about 0.8 M parameters.
TINY_LLAMA = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "vocab_size": 2048,
}


def _corpus(limit: int = 400) -> list[str]:
    """Python files of the standard library: local, plentiful, deterministic text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(p) for p in sorted(stdlib.glob("*.py"))[:limit]]


def build_tiny_model(directory: Path, seed: int = 0, **overrides: int) -> Path:
    """Write a tiny random-weight Llama checkpoint with its tokenizer into `directory`.

    Reuses the directory when it already holds a model built with the same settings.
    """
    import torch  # the cpu extra
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import (  # noqa: PLC0415
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )
    from transformers.utils import logging as transformers_logging  # noqa: PLC0415

    transformers_logging.disable_progress_bar()

    settings = {**TINY_LLAMA, **overrides, "seed": seed}
    stamp = directory / "rackserve-tiny.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return directory
    directory.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        model_max_length=settings["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{k: v for k, v in settings.items() if k != "seed"},
        bos_token_id=fast.bos_token_id,
        eos_token_id=[fast.eos_token_id, fast.convert_tokens_to_ids("<|end|>")],
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    stamp.write_text(json.dumps(settings))
    return directory
