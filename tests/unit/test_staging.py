"""Staging model weights into a node's store: real checkpoints (written by the safetensors
library), real SHA256SUMS files (written by `sha256sum`), real copies in tmp_path."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from deployer.errors import ExitCode
from deployer.staging import (
    SUMS_FILE,
    FileEntry,
    Manifest,
    StagingError,
    StagingInputError,
    check_in_place,
    model_dir_name,
    read_manifest,
    stage_from_directory,
    verify_file,
    verify_model,
)
from deployer.staging.hub import served_files
from deployer.staging.store import _stage_new, copy_from
from deployer.staging.verify import safetensors_problem
from tests.checkpoints import SHARDS, flip_last_byte, write_checkpoint, write_sums

pytestmark = pytest.mark.unit

MODEL = "org/tiny"
NODE = "gpu-7"


def tree(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """A umask that would make files 0600 and directories 0700: staging sets modes itself."""
    before = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(before)


def inodes(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(directory).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
        if p.is_file()
    }


# --- the first stage, and the next ones -----------------------------------------------------


@pytest.mark.usefixtures("strict_umask")
def test_the_first_stage_copies_every_file_and_the_copy_verifies(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", sums=True)
    store = tmp_path / "store"
    result = stage_from_directory(source, store, MODEL, node=NODE)

    final = store / "org--tiny"
    assert result.path == final
    assert (result.model, result.node) == (MODEL, NODE)
    assert result.copied_files == 6  # config, tokenizer, index, two shards, SHA256SUMS
    assert result.copied_bytes == sum(len(b) for b in tree(source).values())
    assert (result.kept_files, result.extra_files) == (0, ())
    assert tree(final) == tree(source)
    assert os.listdir(store) == ["org--tiny"]  # no temporary left beside it
    assert check_in_place(final, MODEL, node=NODE).kept_files == 6
    for shard in SHARDS:  # what vLLM will load reads back as written
        staged, original = load_file(str(final / shard)), load_file(str(source / shard))
        assert staged.keys() == original.keys()
        for name, tensor in original.items():
            np.testing.assert_array_equal(staged[name], tensor)
    assert stat.S_IMODE(store.stat().st_mode) == 0o755  # made by staging: others may read
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in final.iterdir()} == {0o644}


def test_a_second_run_copies_nothing_and_leaves_the_files_untouched(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", sums=True)
    store = tmp_path / "store"
    stage_from_directory(source, store, MODEL, node=NODE)
    before = inodes(store / "org--tiny")

    again = stage_from_directory(source, store, MODEL, node=NODE)

    assert (again.copied_files, again.copied_bytes, again.kept_files) == (0, 0, 6)
    assert inodes(store / "org--tiny") == before


@pytest.mark.usefixtures("strict_umask")
def test_files_in_subdirectories_are_staged_with_their_paths(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src")
    (source / "tokenizer").mkdir()
    (source / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    write_sums(source)
    result = stage_from_directory(source, tmp_path / "store", MODEL, node=NODE)
    staged = result.path / "tokenizer" / "vocab.txt"
    assert staged.read_text() == "a\nb\n"
    assert stat.S_IMODE(staged.parent.stat().st_mode) == 0o755
    assert stat.S_IMODE(staged.stat().st_mode) == 0o644
    entry = read_manifest(source, MODEL).entries[-1]
    assert (entry.path, entry.size) == ("tokenizer/vocab.txt", 4)
    assert entry.sha256 is not None  # sha256sum wrote it as `<hex>  tokenizer/vocab.txt`
    assert check_in_place(result.path, MODEL, node=NODE).kept_files == 7


# --- damage: what is caught, and how -----------------------------------------------------------


def test_a_changed_byte_of_the_same_size_is_caught_only_when_sha256sums_lists_it(
    tmp_path: Path,
) -> None:
    plain = write_checkpoint(tmp_path / "plain")
    summed = write_checkpoint(tmp_path / "summed", sums=True)
    store = tmp_path / "store"
    stage_from_directory(plain, store, "plain", node=NODE)
    stage_from_directory(summed, store, "summed", node=NODE)
    flip_last_byte(store / "plain" / SHARDS[1])
    flip_last_byte(store / "summed" / SHARDS[1])

    # without digests, sizes and headers are all there is: the change goes unseen
    assert verify_model(store / "plain", read_manifest(plain, "plain")) == []
    assert stage_from_directory(plain, store, "plain", node=NODE).copied_files == 0

    problems = verify_model(store / "summed", read_manifest(summed, "summed"))
    assert len(problems) == 1
    assert problems[0].startswith(f"{SHARDS[1]}: SHA-256 ")
    assert "expected" in problems[0]
    repaired = stage_from_directory(summed, store, "summed", node=NODE)
    assert (repaired.copied_files, repaired.kept_files) == (1, 5)
    assert tree(store / "summed") == tree(summed)


def test_a_truncated_file_is_caught_by_its_size_and_repaired(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src")  # no SHA256SUMS: size alone catches it
    store = tmp_path / "store"
    result = stage_from_directory(source, store, MODEL, node=NODE)
    shard = result.path / SHARDS[0]
    full = shard.stat().st_size
    with shard.open("r+b") as handle:
        handle.truncate(full - 10)

    entry = next(e for e in read_manifest(source, MODEL).entries if e.path == SHARDS[0])
    assert verify_file(shard, entry) == f"{SHARDS[0]}: {full - 10:,} bytes, expected {full:,}"
    repaired = stage_from_directory(source, store, MODEL, node=NODE)
    assert (repaired.copied_files, repaired.copied_bytes) == (1, full)
    assert shard.read_bytes() == (source / SHARDS[0]).read_bytes()


def test_a_repair_copies_only_the_bad_file(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", sums=True)
    store = tmp_path / "store"
    final = stage_from_directory(source, store, MODEL, node=NODE).path
    (final / "tokenizer.json").write_text("{}")  # another size: damaged
    before = inodes(final)

    result = stage_from_directory(source, store, MODEL, node=NODE)

    assert result.copied_files == 1
    assert result.copied_bytes == (source / "tokenizer.json").stat().st_size
    assert result.kept_files == 5
    after = inodes(final)
    assert after["tokenizer.json"] != before["tokenizer.json"]
    assert {k: v for k, v in after.items() if k != "tokenizer.json"} == {
        k: v for k, v in before.items() if k != "tokenizer.json"
    }
    assert tree(final) == tree(source)
    assert sorted(os.listdir(final)) == sorted(os.listdir(source))  # no .partial left


def test_a_missing_file_is_restored_and_extra_files_are_reported_not_deleted(
    tmp_path: Path,
) -> None:
    source = write_checkpoint(tmp_path / "src")
    store = tmp_path / "store"
    final = stage_from_directory(source, store, MODEL, node=NODE).path
    (final / "config.json").unlink()
    (final / "notes.txt").write_text("mine")
    (final / "lora").mkdir()
    (final / "lora" / "adapter.bin").write_bytes(b"x")

    result = stage_from_directory(source, store, MODEL, node=NODE)

    assert result.copied_files == 1
    assert result.extra_files == ("lora/adapter.bin", "notes.txt")
    assert (final / "notes.txt").read_text() == "mine"
    assert (final / "config.json").read_bytes() == (source / "config.json").read_bytes()


# --- the safetensors header, parsed by hand ---------------------------------------------------


def real_shard(path: Path) -> bytes:
    save_file(
        {"w": np.arange(12, dtype=np.float32), "b": np.zeros(3, dtype=np.int64)},
        str(path),
        metadata={"format": "pt"},
    )
    return path.read_bytes()


def with_header(header: object, data: bytes, *, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def test_files_written_by_the_safetensors_library_have_sound_headers(tmp_path: Path) -> None:
    real_shard(tmp_path / "a.safetensors")
    save_file({}, str(tmp_path / "empty.safetensors"))  # no tensors at all: still sound
    assert safetensors_problem(tmp_path / "a.safetensors") is None
    assert safetensors_problem(tmp_path / "empty.safetensors") is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x01\x00", "too short for a safetensors file"),
        (struct.pack("<Q", 0) + b"{}", "header length 0 does not fit"),
        (struct.pack("<Q", 10_000) + b"{}" + b"\0" * 8, "header length 10,000 does not fit"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not UTF-8 JSON"),
        (struct.pack("<Q", 5) + b"{nope", "not UTF-8 JSON"),
        (with_header([1, 2], b""), "not a JSON object"),
        (with_header({"w": {"dtype": "F32"}}, b"\0" * 8), "tensor 'w': data_offsets None"),
        (with_header({"w": {"data_offsets": [0, 16]}}, b"\0" * 8), "not within the 8 data"),
        (with_header({"w": {"data_offsets": [4, 2]}}, b"\0" * 4), "not within"),
        (with_header({"w": {"data_offsets": [0, True]}}, b"\0"), "not within"),
        (with_header({"w": {"data_offsets": [0, 4]}}, b"\0" * 8), "end at data byte 4"),
    ],
)
def test_broken_safetensors_headers_are_reported(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(content)
    found = verify_file(shard, FileEntry("model.safetensors", len(content)))
    assert found is not None
    assert found.startswith("model.safetensors: ")
    assert problem in found


def test_metadata_is_not_taken_for_a_tensor(tmp_path: Path) -> None:
    content = with_header(
        {"__metadata__": {"format": "pt"}, "w": {"dtype": "U8", "data_offsets": [0, 3]}}, b"abc"
    )
    (tmp_path / "m.safetensors").write_bytes(content)
    assert verify_file(tmp_path / "m.safetensors", FileEntry("m.safetensors", len(content))) is None


def test_the_header_is_checked_only_for_safetensors_files(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\xff" * 16)  # a safetensors file would be refused
    assert verify_file(tmp_path / "weights.bin", FileEntry("weights.bin", 16)) is None


def test_a_source_with_a_broken_shard_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src")
    shard = source / SHARDS[1]
    data = bytearray(shard.read_bytes())
    data[0:8] = struct.pack("<Q", len(data))  # the header length runs past the end
    shard.write_bytes(bytes(data))
    store = tmp_path / "store"

    with pytest.raises(StagingError) as caught:
        stage_from_directory(source, store, MODEL, node=NODE)

    message = str(caught.value)
    assert message.startswith(f"node {NODE}: model '{MODEL}': the copy of {SHARDS[1]}: ")
    assert "header length" in message
    assert "may be damaged" in message
    assert caught.value.exit_code == ExitCode.FAILURE
    assert os.listdir(store) == []


def test_a_source_that_fails_its_own_sha256sums_is_refused(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", sums=True)
    flip_last_byte(source / SHARDS[0])
    store = tmp_path / "store"
    with pytest.raises(StagingError, match=rf"{SHARDS[0]}: SHA-256 [0-9a-f]{{64}}, expected"):
        stage_from_directory(source, store, MODEL, node=NODE)
    assert os.listdir(store) == []
    with pytest.raises(StagingError, match="does not verify") as caught:
        check_in_place(source, MODEL, node=NODE)
    assert f"  - {SHARDS[0]}: SHA-256" in str(caught.value)


def test_a_source_that_changes_size_during_the_copy_is_named(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src")
    manifest = read_manifest(source, MODEL)  # listed, then the file grows before it is copied
    with (source / "tokenizer.json").open("ab") as handle:
        handle.write(b"   ")
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(StagingError, match=r"tokenizer\.json changed during the copy") as caught:
        _stage_new(copy_from(source), store, store / "org--tiny", manifest)
    assert "now" in str(caught.value)
    assert os.listdir(store) == []


# --- interrupted runs ---------------------------------------------------------------------------


def test_a_staging_directory_left_by_an_interrupted_run_is_removed(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src")
    store = tmp_path / "store"
    stale = store / ".staging-org--tiny-999999"
    stale.mkdir(parents=True)
    (stale / SHARDS[0]).write_bytes(b"half a shard")
    unrelated = store / ".staging-notes"  # not a name staging uses: kept
    unrelated.mkdir()

    result = stage_from_directory(source, store, MODEL, node=NODE)

    assert result.copied_files == 5
    assert sorted(os.listdir(store)) == [".staging-notes", "org--tiny"]
    assert tree(result.path) == tree(source)


def test_partial_files_left_by_an_interrupted_repair_are_removed(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src")
    store = tmp_path / "store"
    final = stage_from_directory(source, store, MODEL, node=NODE).path
    (final / f".{SHARDS[0]}.partial").write_bytes(b"half")
    (final / "config.json").unlink()

    result = stage_from_directory(source, store, MODEL, node=NODE)

    assert result.copied_files == 1
    assert sorted(os.listdir(final)) == sorted(os.listdir(source))


# --- the manifest -------------------------------------------------------------------------------


def test_the_manifest_lists_files_with_sizes_and_skips_hidden_ones(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", sums=True)
    (source / ".git").mkdir()
    (source / ".git" / "HEAD").write_text("ref")
    (source / ".cache" / "huggingface").mkdir(parents=True)
    (source / ".cache" / "huggingface" / "x.lock").write_text("")
    (source / ".gitattributes").write_text("*.safetensors filter=lfs")

    manifest = read_manifest(source, MODEL)

    assert manifest.model == MODEL
    assert [e.path for e in manifest.entries] == sorted(
        ["config.json", "tokenizer.json", "model.safetensors.index.json", *SHARDS, SUMS_FILE]
    )
    assert all(e.size == (source / e.path).stat().st_size for e in manifest.entries)
    assert manifest.total_bytes == sum((source / e.path).stat().st_size for e in manifest.entries)
    digests = {e.path: e.sha256 for e in manifest.entries}
    assert digests[SUMS_FILE] is None
    assert (
        digests["config.json"]
        == (
            subprocess.run(
                ["sha256sum", "config.json"], cwd=source, capture_output=True, check=True
            )
            .stdout.decode()
            .split()[0]
        )
    )


def test_binary_mode_dot_slash_and_escaped_names_from_sha256sum_are_read(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src")
    (source / "odd\\name.txt").write_text("backslash")
    (source / "two words.txt").write_text("space")
    names = sorted(p.name for p in source.iterdir())
    listing = subprocess.run(
        ["sha256sum", "--binary", *(f"./{n}" for n in names)],
        cwd=source,
        check=True,
        capture_output=True,
    ).stdout
    assert listing.count(b" *./") == len(names)
    assert b"\n\\" in listing  # sha256sum escaped the backslash name
    upper = [  # upper-case hex is read too
        line[:65].upper() + line[65:] if line.startswith(b"\\") else line[:64].upper() + line[64:]
        for line in listing.split(b"\n")
    ]
    (source / SUMS_FILE).write_bytes(b"\n".join(upper))

    digests = {e.path: e.sha256 for e in read_manifest(source, MODEL).entries}

    assert set(digests) == {*names, SUMS_FILE}
    assert all(digests[n] is not None for n in names)
    odd = subprocess.run(["sha256sum"], input=b"backslash", capture_output=True, check=True)
    assert digests["odd\\name.txt"] == odd.stdout.split()[0].decode()
    assert verify_model(source, read_manifest(source, MODEL)) == []


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not-a-digest  config.json", "expected '<64 hex digits>  <relative path>'"),
        ("0" * 64 + " config.json", "expected '<64 hex digits>  <relative path>'"),
        ("0" * 63 + "  config.json", "expected '<64 hex digits>  <relative path>'"),
        ("SHA256 (config.json) = " + "0" * 64, "expected '<64 hex digits>  <relative path>'"),
        ("\\" + "0" * 64 + "  bad\\qescape", "expected '<64 hex digits>  <relative path>'"),
        ("0" * 64 + "  ../outside.safetensors", "'../outside.safetensors' leaves the directory"),
        ("0" * 64 + "  sub/../../x", "leaves the directory"),
        ("0" * 64 + "  /etc/passwd", "'/etc/passwd' is absolute"),
        ("0" * 64 + "  .", "names the directory itself"),
        ("0" * 64 + "  SHA256SUMS", "cannot be listed"),
        ("0" * 64 + "  .config.json.partial", "cannot be listed"),
    ],
)
def test_bad_sha256sums_lines_are_refused_with_their_line_number(
    tmp_path: Path, line: str, problem: str
) -> None:
    source = write_checkpoint(tmp_path / "src", sums=True)
    good = (source / SUMS_FILE).read_text().splitlines()
    (source / SUMS_FILE).write_text("\n".join([*good[:2], line, *good[2:]]) + "\n")

    with pytest.raises(StagingInputError) as caught:
        read_manifest(source, MODEL)

    assert str(caught.value).startswith(f"{source / SUMS_FILE} line 3: ")
    assert problem in str(caught.value)
    assert caught.value.exit_code == ExitCode.BAD_INPUT


def test_a_file_listed_twice_or_missing_is_refused_with_its_line(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", sums=True)
    sums = source / SUMS_FILE
    good = sums.read_text()
    sums.write_text(good + good.splitlines()[0] + "\n")
    with pytest.raises(StagingInputError, match=r"line 6: .* is listed twice \(also line 1\)"):
        read_manifest(source, MODEL)

    sums.write_text(good + "0" * 64 + "  tokenizer_config.json\n")
    with pytest.raises(StagingInputError) as caught:
        stage_from_directory(source, tmp_path / "store", MODEL, node=NODE)
    assert str(caught.value) == (
        f"node {NODE}: model '{MODEL}': {sums} line 6: lists 'tokenizer_config.json', "
        f"which is not in {source}"
    )
    assert not (tmp_path / "store").exists()


def test_links_inside_the_checkpoint_are_followed_and_links_outside_refused(
    tmp_path: Path,
) -> None:
    source = write_checkpoint(tmp_path / "src")
    (source / "blobs").mkdir()
    (source / "blobs" / "abc123").write_text('{"vocab": 1}')
    (source / "vocab.json").symlink_to("blobs/abc123")
    staged = stage_from_directory(source, tmp_path / "store", MODEL, node=NODE).path
    assert not (staged / "vocab.json").is_symlink()
    assert (staged / "vocab.json").read_text() == '{"vocab": 1}'

    (tmp_path / "secret").write_text("not the model's")
    (source / "generation_config.json").symlink_to(tmp_path / "secret")
    with pytest.raises(StagingInputError, match=r"generation_config\.json is a link to .*outside"):
        read_manifest(source, MODEL)

    (source / "generation_config.json").unlink()
    (source / "more").symlink_to(source / "blobs")
    with pytest.raises(StagingInputError, match="'more' is a link to a directory"):
        read_manifest(source, MODEL)


def test_a_missing_or_empty_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StagingError, match="does not exist"):
        read_manifest(tmp_path / "nowhere", MODEL)
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    (tmp_path / "empty" / ".git" / "HEAD").write_text("x")
    with pytest.raises(StagingInputError, match="holds no files to stage"):
        read_manifest(tmp_path / "empty", MODEL)


@pytest.mark.parametrize("path", ["../x", "/abs", "", "a/../../b", "."])
def test_a_manifest_entry_cannot_leave_its_directory(path: str) -> None:
    with pytest.raises(StagingInputError):
        FileEntry(path, 1)


# --- checking in place --------------------------------------------------------------------------


def test_check_in_place_lists_every_problem(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "shared", sums=True)
    manifest = read_manifest(source, MODEL)
    ok = check_in_place(source, MODEL, node=NODE, manifest=manifest)
    assert (ok.path, ok.copied_files, ok.kept_files, ok.extra_files) == (source, 0, 6, ())

    (source / "config.json").unlink()
    flip_last_byte(source / SHARDS[0])
    (source / "extra.txt").write_text("x")
    with pytest.raises(StagingError) as caught:
        check_in_place(source, MODEL, node=NODE, manifest=manifest)
    lines = str(caught.value).splitlines()
    assert lines[:2] == [
        f"node {NODE}: model '{MODEL}': {source} does not verify:",
        "  - config.json: missing",
    ]
    assert lines[2].startswith(f"  - {SHARDS[0]}: SHA-256 ")
    assert len(lines) == 3
    assert caught.value.exit_code == ExitCode.FAILURE


def test_check_in_place_reports_extra_files_against_a_given_manifest(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src")
    manifest = read_manifest(source, MODEL)
    (source / "README.md").write_text("# model")
    result = check_in_place(source, MODEL, node=NODE, manifest=manifest)
    assert result.extra_files == ("README.md",)
    assert check_in_place(source, MODEL, node=NODE).kept_files == len(manifest.entries) + 1


def test_a_manifest_totals_its_entries() -> None:
    manifest = Manifest("m", (FileEntry("a", 3), FileEntry("b/c", 4, "0" * 64)))
    assert manifest.total_bytes == 7


# --- the directory name -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("org/name", "org--name"),
        ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama--Llama-3.1-8B-Instruct"),
        ("llama-3.1-8b", "llama-3.1-8b"),
        ("a/b/c", "a--b--c"),
    ],
)
def test_model_ids_become_one_path_component(model: str, name: str) -> None:
    assert model_dir_name(model) == name
    assert "/" not in name


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("", "empty"),
        (".", "'.'"),
        ("..", "'..'"),
        ("org/..", "'..'"),
        ("/abs", "empty"),
        ("org//name", "empty"),
        ("org/", "empty"),
        ("bad\x1b[31mred", "control characters"),
        ("nul\x00", "control characters"),
        (".staging-x-1", "starts with '.'"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
def test_model_ids_that_cannot_name_a_directory_are_refused(model: str, problem: str) -> None:
    with pytest.raises(StagingInputError, match="cannot name a store directory") as caught:
        model_dir_name(model)
    assert problem in str(caught.value)
    assert "\x1b" not in str(caught.value)


def test_a_bad_model_id_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src")
    with pytest.raises(StagingInputError, match=f"node {NODE}: model '..': "):
        stage_from_directory(source, tmp_path / "store", "..", node=NODE)
    assert not (tmp_path / "store").exists()


def test_a_file_where_the_model_directory_should_be_is_refused(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "org--tiny").write_text("in the way")
    with pytest.raises(StagingError, match="is a link or not a directory"):
        stage_from_directory(source, tmp_path / "store", MODEL, node=NODE)
    assert (tmp_path / "store" / "org--tiny").read_text() == "in the way"


@pytest.mark.parametrize(
    ("repo", "staged"),
    [
        pytest.param(
            ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json",
             ".gitattributes", "README.md", "original/consolidated.00.pth", "onnx/model.onnx"],
            ["README.md", "config.json", "model.safetensors", "tokenizer.json"],
            id="safetensors-win-over-bin-and-the-rest",
        ),
        pytest.param(
            ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
             "pytorch_model.bin.index.json", "flax_model.msgpack", "tf_model.h5"],
            ["config.json", "pytorch_model-00001-of-00002.bin",
             "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"],
            id="bin-when-no-safetensors",
        ),
        pytest.param(
            ["config.json", "model.pt", "quant/extra.safetensors", "tokenizer/vocab.txt"],
            ["config.json", "model.pt", "tokenizer/vocab.txt"],
            id="pt-and-nested-weights-left",
        ),
        pytest.param(
            ["config.json", ".cache/x", "sub/.hidden", "model.safetensors.index.json"],
            ["config.json", "model.safetensors.index.json"],
            id="hidden-left",
        ),
    ],
)  # fmt: skip
def test_a_hub_repo_is_staged_with_the_files_vllms_loader_reads(
    repo: list[str], staged: list[str]
) -> None:
    assert served_files(repo) == staged
