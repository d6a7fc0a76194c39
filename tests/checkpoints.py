"""Small real checkpoints for the staging tests: written by the safetensors library, with
SHA256SUMS written by coreutils' `sha256sum`, as a hub download or a conversion leaves them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from deployer.staging import SUMS_FILE

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def write_checkpoint(directory: Path, *, sums: bool = False) -> Path:
    """A two-shard checkpoint: config.json, tokenizer.json, index, shards; SHA256SUMS if asked."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    weight_map = {}
    for number, shard in enumerate(SHARDS):
        tensors = {
            f"layers.{number}.weight": np.arange(256, dtype=np.float32).reshape(16, 16) + number,
            f"layers.{number}.bias": np.ones(16, dtype=np.float16),
        }
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    index = {"metadata": {"total_size": 2 * (256 * 4 + 16 * 2)}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    if sums:
        write_sums(directory)
    return directory


def write_sums(directory: Path, *extra_args: str) -> None:
    """SHA256SUMS as coreutils writes it, for every non-hidden file (recursively)."""
    names = sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != SUMS_FILE and not p.name.startswith(".")
    )
    listing = subprocess.run(
        ["sha256sum", *extra_args, *names], cwd=directory, check=True, capture_output=True
    ).stdout
    (directory / SUMS_FILE).write_bytes(listing)


def flip_last_byte(path: Path) -> None:
    """Change one byte of the tensor data (the header stays sound, the size the same)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
