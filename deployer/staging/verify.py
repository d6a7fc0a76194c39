"""Whether the files on disk are the checkpoint's: size, safetensors header and SHA-256.

`verify_file` checks one file against its manifest entry and says what is wrong in one line;
`verify_model` does every file of a manifest. The safetensors header is parsed here by hand
(8 bytes of little-endian header length, a JSON object, then the tensor data) so that a
truncated or garbled shard is caught without loading it, and without the safetensors library.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from pathlib import Path

from deployer.errors import printable, shown
from deployer.staging.manifest import FileEntry, Manifest

CHUNK_BYTES = 1024 * 1024
"""Bytes read at a time when hashing."""

_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors library refuses larger headers too


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's header and layout; None when it is sound.

    The header length N is positive and the header fits in the file, the header is a JSON
    object (`__metadata__` allowed), every tensor's `data_offsets` lie within the data area,
    and the largest end is the data area's size (no bytes missing, none trailing).
    """
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{size} bytes: too short for a safetensors file"
            (length,) = struct.unpack("<Q", prefix)
            if length == 0 or length > _HEADER_LIMIT or 8 + length > size:
                return f"safetensors header length {length:,} does not fit a file of {size:,} bytes"
            raw = handle.read(length)
    except OSError as exc:
        return f"cannot read: {exc.strerror}"
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is one
        return f"safetensors header is not UTF-8 JSON: {exc}"
    if not isinstance(header, dict):
        return "safetensors header is not a JSON object"
    data_bytes = size - 8 - length
    largest_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            return (
                f"tensor {shown(name)}: data_offsets {shown(offsets)} are not within the "
                f"{data_bytes:,} data bytes"
            )
        largest_end = max(largest_end, offsets[1])
    if largest_end != data_bytes:
        return f"the tensors end at data byte {largest_end:,}, but the file has {data_bytes:,}"
    return None


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file in lower-case hex, read in CHUNK_BYTES pieces."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while count := handle.readinto(view):
            digest.update(view[:count])
    return digest.hexdigest()


def verify_file(path: Path, entry: FileEntry) -> str | None:
    """None when `path` is the file `entry` describes, else one line saying what is wrong.

    A regular file (links followed) of the entry's size; a `*.safetensors` file with a sound
    header; the entry's SHA-256 when it has one. Cheap checks first: a file of the wrong size
    is not hashed.
    """
    name = printable(entry.path)
    try:
        info = path.stat()
    except FileNotFoundError:
        return f"{name}: missing"
    except OSError as exc:
        return f"{name}: cannot read: {exc.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return f"{name}: not a regular file"
    if info.st_size != entry.size:
        return f"{name}: {info.st_size:,} bytes, expected {entry.size:,}"
    if entry.path.endswith(".safetensors"):
        problem = safetensors_problem(path)
        if problem:
            return f"{name}: {problem}"
    if entry.sha256 is not None:
        try:
            actual = file_sha256(path)
        except OSError as exc:
            return f"{name}: cannot read: {exc.strerror}"
        if actual != entry.sha256:
            return f"{name}: SHA-256 {actual}, expected {entry.sha256} (SHA256SUMS)"
    return None


def verify_model(directory: Path, manifest: Manifest) -> list[str]:
    """Every problem of the files in `directory` against the manifest; empty when all verify."""
    problems = (verify_file(directory / entry.path, entry) for entry in manifest.entries)
    return [problem for problem in problems if problem is not None]
