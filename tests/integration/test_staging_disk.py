"""Staging onto a store that is too small: real tmpfs mounts of a few MiB (root).

A model larger than the free space is refused before anything is written; a disk or inode
table that fills in the middle of a copy leaves nothing behind; the space check counts only
what is still to copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from deployer.errors import ExitCode
from deployer.staging import (
    SPACE_MARGIN_BYTES,
    DiskSpaceError,
    StagingError,
    read_manifest,
    stage_from_directory,
)
from deployer.staging.store import _repair, _stage_new, copy_from
from tests.conftest import Mount

pytestmark = pytest.mark.integration

MODEL = "org/big"
NODE = "gpu-3"
MiB = 1024 * 1024


def write_checkpoint(directory: Path, shard_mib: int) -> Path:
    """config.json, a tokenizer and one float32 shard of about `shard_mib` MiB."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (directory / "tokenizer.json").write_text(json.dumps({"model": {}}))
    weights = np.arange(shard_mib * MiB // 4, dtype=np.float32)
    save_file({"w": weights}, str(directory / "model.safetensors"))
    return directory


def needed_on(store: Path, sizes: list[int]) -> int:
    block = os.statvfs(store).f_frsize
    return sum(-(-size // block) * block for size in sizes) + SPACE_MARGIN_BYTES


def fill(store: Path, leave: int) -> None:
    """Write a filler file until only about `leave` bytes are free."""
    with (store / "filler").open("wb") as handle:
        handle.truncate(0)
        free = shutil.disk_usage(store).free
        handle.write(b"\0" * max(free - leave, 0))
    assert shutil.disk_usage(store).free <= leave + 4096


def test_a_model_larger_than_the_free_space_is_refused_before_anything_is_written(
    tmp_path: Path, tmpfs: Mount
) -> None:
    store = tmpfs("size=4m")
    source = write_checkpoint(tmp_path / "src", shard_mib=5)
    free = shutil.disk_usage(store).free
    sizes = [p.stat().st_size for p in source.iterdir()]
    short = needed_on(store, sizes) - free

    with pytest.raises(DiskSpaceError) as caught:
        stage_from_directory(source, store, MODEL, node=NODE)

    message = str(caught.value)
    assert message.startswith(f"node {NODE}: model '{MODEL}': not enough space in {store}")
    assert f"{short / MiB:.2f} MiB ({short:,} bytes) short" in message
    assert f"{free / MiB:.2f} MiB ({free:,} bytes) is free" in message
    assert f"{needed_on(store, sizes):,} bytes" in message
    assert "Nothing was written" in message
    assert caught.value.exit_code == ExitCode.FAILURE
    assert isinstance(caught.value, StagingError)
    assert os.listdir(store) == []
    assert shutil.disk_usage(store).free == free


def test_the_space_check_counts_only_what_is_still_to_copy(tmp_path: Path, tmpfs: Mount) -> None:
    source = write_checkpoint(tmp_path / "src", shard_mib=6)
    sizes = [p.stat().st_size for p in source.iterdir()]
    room = needed_on(tmp_path, sizes) - SPACE_MARGIN_BYTES  # the checkpoint in whole blocks
    store = tmpfs(f"size={(SPACE_MARGIN_BYTES + room) // 4096 * 4096 + 2 * MiB}")
    first = stage_from_directory(source, store, MODEL, node=NODE)
    assert first.copied_files == 3
    # the whole model would no longer pass the check; the one missing file does
    assert shutil.disk_usage(store).free < needed_on(store, sizes)
    (first.path / "config.json").unlink()

    again = stage_from_directory(source, store, MODEL, node=NODE)

    assert (again.copied_files, again.kept_files) == (1, 2)
    assert (first.path / "config.json").read_bytes() == (source / "config.json").read_bytes()


def test_running_out_of_inodes_in_the_middle_of_a_stage_leaves_nothing(
    tmp_path: Path, tmpfs: Mount
) -> None:
    # bytes to spare, but inodes for the root, the staging directory and two files only: the
    # space check passes and the third file cannot be created
    store = tmpfs(f"size={SPACE_MARGIN_BYTES + 16 * MiB},nr_inodes=4")
    source = write_checkpoint(tmp_path / "src", shard_mib=1)
    free = shutil.disk_usage(store).free

    with pytest.raises(StagingError) as caught:
        stage_from_directory(source, store, MODEL, node=NODE)

    message = str(caught.value)
    assert not isinstance(caught.value, DiskSpaceError)
    assert message.startswith(f"node {NODE}: model '{MODEL}': copying tokenizer.json to ")
    assert "no space left on the device" in message
    assert f"nothing of it was left in {store}" in message
    assert os.listdir(store) == []
    assert shutil.disk_usage(store).free == free


def test_a_disk_that_fills_in_the_middle_of_a_copy_leaves_nothing(
    tmp_path: Path, tmpfs: Mount
) -> None:
    # The public function checks the space first, so the copy step is driven directly on a
    # disk with 1 MiB free: config.json fits, the 2 MiB shard runs out of space half way.
    store = tmpfs("size=4m")
    source = write_checkpoint(tmp_path / "src", shard_mib=2)
    fill(store, leave=1 * MiB)

    with pytest.raises(StagingError) as caught:
        _stage_new(copy_from(source), store, store / "org--big", read_manifest(source, MODEL))

    message = str(caught.value)
    assert message.startswith("copying model.safetensors to ")
    assert "No space left on device" in message
    assert os.listdir(store) == ["filler"]


def test_a_repair_that_runs_out_of_space_keeps_the_old_file_and_no_partial(
    tmp_path: Path, tmpfs: Mount
) -> None:
    store = tmpfs(f"size={SPACE_MARGIN_BYTES + 16 * MiB}")
    source = write_checkpoint(tmp_path / "src", shard_mib=2)
    final = stage_from_directory(source, store, MODEL, node=NODE).path
    shard = final / "model.safetensors"
    with shard.open("r+b") as handle:
        handle.truncate(MiB)  # damaged
    fill(store, leave=MiB // 2)
    entry = next(e for e in read_manifest(source, MODEL).entries if e.path == "model.safetensors")

    with pytest.raises(StagingError, match="its partial copy was removed") as caught:
        _repair(copy_from(source), final, entry)

    assert "no space left on the device" in str(caught.value)
    assert sorted(os.listdir(final)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert shard.stat().st_size == MiB
