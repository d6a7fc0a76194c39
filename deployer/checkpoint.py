"""Reading what the estimator needs from a model's files: config.json and tensor sizes.

The side-effect half of estimation: a local directory is read directly (config.json, the
safetensors headers or `model.safetensors.index.json`); a Hugging Face repo id goes through
`huggingface_hub`, which honours its cache, `HF_HUB_OFFLINE` and `HF_ENDPOINT`.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

from deployer.estimate import SAFETENSORS_DTYPE_BYTES, CheckpointSize, EstimateError

_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).exists()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EstimateError(f"cannot read {path}: {exc}") from None
    if not isinstance(document, dict):
        raise EstimateError(f"{path} is not a JSON object")
    return document


def safetensors_header_sizes(path: Path) -> dict[str, int]:
    """Bytes per dtype tag of the tensors in one safetensors file, read from its header only."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > _HEADER_LIMIT:
            raise EstimateError(f"{path}: safetensors header of {length} bytes is not plausible")
        header = json.loads(handle.read(length))
    sizes: dict[str, int] = defaultdict(int)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        sizes[info["dtype"] if info["dtype"] in SAFETENSORS_DTYPE_BYTES else "?"] += end - start
    return dict(sizes)


def local_checkpoint_size(directory: Path) -> CheckpointSize | None:
    """Tensor bytes of a local checkpoint: the shards' headers, else the index's total_size."""
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        total: dict[str, int] = defaultdict(int)
        for shard in shards:
            for tag, size in safetensors_header_sizes(shard).items():
                total[tag] += size
        return CheckpointSize(dict(total), source="safetensors headers")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        size = _read_json(index).get("metadata", {}).get("total_size")
        if isinstance(size, int) and size > 0:
            return CheckpointSize({"?": size}, source="index total_size")
    return None


def _hub_config(repo_id: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download  # noqa: PLC0415 - only when the model is remote

    try:
        path = hf_hub_download(repo_id, "config.json")
    except Exception as exc:
        reason = type(exc).__name__
        raise EstimateError(
            f"{repo_id!r} is not a local directory and its config.json could not be fetched "
            f"from the Hugging Face hub ({reason}); download the model and point model_source "
            "at its directory, or set gpu_memory_gib to give the footprint by hand"
        ) from None
    return _read_json(Path(path))


def _hub_checkpoint_size(repo_id: str) -> CheckpointSize | None:
    from huggingface_hub import get_safetensors_metadata  # noqa: PLC0415

    try:
        metadata = get_safetensors_metadata(repo_id)
    except Exception:
        return None
    sizes: dict[str, int] = defaultdict(int)
    for tag, count in metadata.parameter_count.items():
        sizes[tag] += count * SAFETENSORS_DTYPE_BYTES.get(tag, 2)
    return CheckpointSize(dict(sizes), source="hub metadata")


def read_model_files(source: str) -> tuple[dict[str, Any], CheckpointSize | None]:
    """config.json and the checkpoint's tensor sizes (None when unknown) for a model source."""
    if _looks_like_path(source):
        directory = Path(source).expanduser()
        if not directory.is_dir():
            raise EstimateError(f"model_source {source!r} is not a directory")
        config = directory / "config.json"
        if not config.is_file():
            raise EstimateError(
                f"no config.json in {directory}; set gpu_memory_gib to give the footprint by hand"
            )
        return _read_json(config), local_checkpoint_size(directory)
    return _hub_config(source), _hub_checkpoint_size(source)
