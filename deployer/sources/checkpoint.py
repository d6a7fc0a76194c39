"""Reading what the estimator needs from a model's files: config.json and tensor sizes.

The side-effect half of estimation: a local directory is read directly (config.json, the
safetensors headers or `model.safetensors.index.json`); a Hugging Face repo id goes through
`huggingface_hub`, which honours its cache, `HF_HUB_OFFLINE` and `HF_ENDPOINT`. The hub is
asked once, without retries: when it cannot be reached the message says what to set instead.

Every file goes through the input boundary (`deployer.config.documents`): size-capped, UTF-8, JSON
without duplicate keys or deep nesting; safetensors headers are checked against the file.
"""

from __future__ import annotations

import os
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

from deployer.config.documents import DocumentError, decode_utf8, parse_json, read_bytes
from deployer.errors import printable, shown
from deployer.planning.estimate import SAFETENSORS_DTYPE_BYTES, CheckpointSize, EstimateError

_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB
_INDEX_LIMIT = 64 * 1024 * 1024  # model.safetensors.index.json of the largest models: ~10 MB
_MAX_CHECKPOINT_BYTES = 2**50  # 1 PiB
_HUB_TIMEOUT_S = 10.0

_HUB_HELP = (
    "set HF_HUB_OFFLINE=1 to use only the local Hugging Face cache, set HF_ENDPOINT to a "
    "reachable hub mirror, point model_source at a local directory, or set gpu_memory_gib to "
    "give the footprint by hand"
)


def _looks_like_path(source: str) -> bool:
    """Absolute, `~`, `./` or `../`: a local path (relative sources were resolved on loading)."""
    return source in {".", ".."} or source.startswith(("/", "./", "../", "~"))


def _read_json(path: Path, limit: int = 8 * 1024 * 1024) -> dict[str, Any]:
    """A JSON object from a file written by others (non-finite numbers left to the reader)."""
    try:
        document = parse_json(decode_utf8(read_bytes(path, limit)), strict=False)
    except DocumentError as exc:
        raise EstimateError(f"{_path(path)}: {exc}") from None
    if not isinstance(document, dict):
        raise EstimateError(f"{_path(path)} is not a JSON object")
    return document


def _path(path: Path | str) -> str:
    return printable(str(path))


def safetensors_header_sizes(path: Path) -> dict[str, int]:
    """Bytes per dtype tag of the tensors in one safetensors file, read from its header only."""
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise EstimateError(f"{_path(path)} is too short for a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(_HEADER_LIMIT, size - 8):
                raise EstimateError(
                    f"{_path(path)}: a safetensors header of {length:,} bytes is not plausible "
                    f"in a file of {size:,} bytes"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise EstimateError(f"cannot read {_path(path)}: {exc.strerror or exc}") from None
    try:
        header = parse_json(decode_utf8(raw), strict=False)
    except DocumentError as exc:
        raise EstimateError(f"{_path(path)}: its safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise EstimateError(f"{_path(path)}: its safetensors header is not a JSON object")
    data_bytes = size - 8 - length
    sizes: dict[str, int] = defaultdict(int)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if not (
            isinstance(dtype, str)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            raise EstimateError(
                f"{_path(path)}: tensor {shown(name)} has no valid dtype and data_offsets "
                f"within the file's {data_bytes:,} data bytes (got {shown(info)})"
            )
        start, end = offsets
        sizes[dtype if dtype in SAFETENSORS_DTYPE_BYTES else "?"] += end - start
    return dict(sizes)


def _index_size(index: Path) -> int | None:
    """total_size of a model.safetensors.index.json, if it gives one."""
    document = _read_json(index, _INDEX_LIMIT)
    metadata = document.get("metadata", {})
    if not isinstance(metadata, dict):
        raise EstimateError(f"{_path(index)}: metadata is not a mapping (got {shown(metadata)})")
    size: object = metadata.get("total_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= _MAX_CHECKPOINT_BYTES:
        raise EstimateError(
            f"{_path(index)}: metadata.total_size is {shown(size)}, not a byte count from 1 to "
            f"{_MAX_CHECKPOINT_BYTES:,}"
        )
    return size


def local_checkpoint_size(directory: Path) -> CheckpointSize | None:
    """Tensor bytes of a local checkpoint: the shards' headers, else the index's total_size."""
    try:
        shards = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
        index = directory / "model.safetensors.index.json"
        has_index = index.is_file()
    except OSError as exc:
        raise EstimateError(f"cannot list {_path(directory)}: {exc.strerror or exc}") from None
    if shards:
        total: dict[str, int] = defaultdict(int)
        for shard in shards:
            for tag, size in safetensors_header_sizes(shard).items():
                total[tag] += size
        if sum(total.values()) > _MAX_CHECKPOINT_BYTES:
            raise EstimateError(f"{_path(directory)}: the shards add up to more than 1 PiB")
        if sum(total.values()) > 0:
            return CheckpointSize(dict(total), source="safetensors headers")
    total_size = _index_size(index) if has_index else None
    if total_size is not None:
        return CheckpointSize({"?": total_size}, source="index total_size")
    return None


def _hub_offline() -> bool:
    from huggingface_hub import constants  # noqa: PLC0415 - only when the model is remote

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or flag in {"1", "on", "yes", "true"}


def _hub_config(repo_id: str) -> dict[str, Any]:
    """config.json from the local Hugging Face cache, else from the hub in one attempt."""
    from huggingface_hub import (  # noqa: PLC0415 - only when the model is remote
        constants,
        get_hf_file_metadata,
        hf_hub_download,
        hf_hub_url,
    )
    from huggingface_hub.errors import (  # noqa: PLC0415
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    what = (
        f"{shown(repo_id)} is not a local directory (a relative model_source is read from the "
        "models file's directory)"
    )
    try:
        return _read_json(Path(hf_hub_download(repo_id, "config.json", local_files_only=True)))
    except HFValidationError:
        raise EstimateError(
            f"model_source {shown(repo_id)} is neither a local directory (a relative "
            "model_source is read from the models file's directory) nor a valid Hugging Face "
            "repo id (ORG/NAME); fix it, or set gpu_memory_gib to give the footprint by hand"
        ) from None
    except LocalEntryNotFoundError:
        pass  # not in the cache: ask the hub below
    if _hub_offline():
        raise EstimateError(
            f"{what}, and its config.json is not in the local Hugging Face cache while "
            "HF_HUB_OFFLINE is set; download the model, unset HF_HUB_OFFLINE, or set "
            "gpu_memory_gib to give the footprint by hand"
        )
    try:
        # One request, no retries (hf_hub_download alone retries for ~25 s when offline).
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=_HUB_TIMEOUT_S)
        path = hf_hub_download(repo_id, "config.json", etag_timeout=_HUB_TIMEOUT_S)
    except LocalEntryNotFoundError as exc:  # the download failed after all
        raise EstimateError(
            f"{what}, and its config.json could not be fetched from the Hugging Face hub at "
            f"{_path(constants.ENDPOINT)} ({type(exc).__name__}); {_HUB_HELP}"
        ) from None
    except (RepositoryNotFoundError, EntryNotFoundError) as exc:
        raise EstimateError(
            f"{what}, and the Hugging Face hub at {_path(constants.ENDPOINT)} has no config.json "
            f"for it ({type(exc).__name__}): check the repo id, log in (HF_TOKEN) for a gated "
            "model, or set gpu_memory_gib to give the footprint by hand"
        ) from None
    except Exception as exc:  # any network failure gets the same advice
        raise EstimateError(
            f"{what}, and the Hugging Face hub at {_path(constants.ENDPOINT)} could not be "
            f"reached ({type(exc).__name__}); {_HUB_HELP}"
        ) from None
    return _read_json(Path(path))


def _hub_checkpoint_size(repo_id: str) -> CheckpointSize | None:
    from huggingface_hub import get_safetensors_metadata  # noqa: PLC0415

    if _hub_offline():
        return None
    try:
        metadata = get_safetensors_metadata(repo_id)
    except Exception:  # unknown size: the parameter count stands in
        return None
    sizes: dict[str, int] = defaultdict(int)
    for tag, count in metadata.parameter_count.items():
        if isinstance(count, int) and 0 < count <= _MAX_CHECKPOINT_BYTES:
            sizes[tag] += count * SAFETENSORS_DTYPE_BYTES.get(tag, 2)
    return CheckpointSize(dict(sizes), source="hub metadata") if sizes else None


def _local_directory(source: str) -> Path:
    """The directory a path-like source names (`~` expanded)."""
    try:
        directory = Path(source).expanduser()
    except RuntimeError:  # ~user of no such user
        raise EstimateError(
            f"model_source {shown(source)}: no such user's home directory"
        ) from None
    try:
        is_dir = directory.is_dir()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a valid path"
        raise EstimateError(f"model_source {shown(source)}: {reason}") from None
    if not is_dir:
        raise EstimateError(f"model_source {shown(source)} is not a directory")
    return directory


def read_model_files(source: str) -> tuple[dict[str, Any], CheckpointSize | None]:
    """config.json and the checkpoint's tensor sizes (None when unknown) for a model source."""
    if _looks_like_path(source):
        directory = _local_directory(source)
        config = directory / "config.json"
        try:
            has_config = config.is_file()
        except OSError as exc:
            raise EstimateError(f"cannot read {_path(config)}: {exc.strerror}") from None
        if not has_config:
            raise EstimateError(
                f"no config.json in {_path(directory)}; set gpu_memory_gib to give the "
                "footprint by hand"
            )
        return _read_json(config), local_checkpoint_size(directory)
    return _hub_config(source), _hub_checkpoint_size(source)
