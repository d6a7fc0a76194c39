"""The model store on a node: checkpoints copied in whole and verified, or repaired file by file.

`stage_from_directory` puts a model's checkpoint in `<store>/<model_dir_name(model)>`, where
vLLM loads it with the hub offline. A model staged for the first time is copied into a hidden
sibling directory (`.staging-<name>-<pid>`), verified, and renamed into place, so an engine
never sees half a model; a model already there has only its missing or damaged files copied,
each to `.<file>.partial` beside it and renamed over the old one once it verifies. Files that
verify are left alone, so a second run copies nothing. Free space is checked before anything
is written; a failure removes what the run was writing and names the node, model and file.

One staging runs at a time per store (an exclusive lock on the store directory): under the
lock every staging temporary is stale, left by an interrupted run, and is removed first.
`check_in_place` only verifies a checkpoint that is already where it will be served from
(a shared filesystem).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from deployer.config.models_config import model_dir_name as config_dir_name
from deployer.errors import printable, shown
from deployer.staging.manifest import (
    FileEntry,
    Manifest,
    StagingError,
    StagingInputError,
    listed_files,
    problems_message,
    read_manifest,
)
from deployer.staging.verify import verify_file, verify_model

SPACE_MARGIN_BYTES = 64 * 1024 * 1024
"""Bytes the store must keep free beyond the copy itself (each file counted in whole blocks).

Room for the filesystem's own metadata (directories, extents) and for what other processes
write while a long copy runs (logs, Ray's spill files): staging never fills a disk to the
last block.
"""

_STAGING_DIR = re.compile(r"^\.staging-.+-\d+$")
_PARTIAL = re.compile(r"^\..+\.partial$")


Fetch = Callable[[FileEntry, Path], None]
"""Writes one file of a checkpoint, whole, to a new path (a local copy, or bytes from another
node); raises OSError or StagingError when it cannot."""


class DiskSpaceError(StagingError):
    """The store has too little free space for the model; nothing was written."""


@dataclass(frozen=True)
class StageResult:
    """What staging did for one model on one node."""

    model: str
    node: str
    path: Path
    """The model's directory in the store: the path vLLM loads."""
    copied_files: int
    copied_bytes: int
    kept_files: int
    """Files already there that verified, left untouched."""
    extra_files: tuple[str, ...] = ()
    """Files in the model's directory that the checkpoint does not have: left, not deleted."""


def model_dir_name(model: str) -> str:
    """The store directory's name for a model id (`org/name` -> `org--name`); see the config's."""
    try:
        return config_dir_name(model)
    except ValueError as exc:
        raise StagingInputError(str(exc)) from None


def amount(size: int) -> str:
    """Bytes for a person: `1.50 GiB (1,610,612,736 bytes)`, MiB below a GiB."""
    if abs(size) >= 1024**3:
        return f"{size / 1024**3:.2f} GiB ({size:,} bytes)"
    return f"{size / 1024**2:.2f} MiB ({size:,} bytes)"


def _on(node: str, model: str) -> str:
    return f"node {printable(node)}: model {shown(model)}"


def _path(path: Path) -> str:
    return printable(str(path))


@contextlib.contextmanager
def _named(node: str, model: str) -> Iterator[None]:
    """StagingErrors raised inside, of the same class, with the node and model in front."""
    try:
        yield
    except StagingError as exc:
        raise type(exc)(f"{_on(node, model)}: {exc}") from None


@contextlib.contextmanager
def _locked(store_dir: Path) -> Iterator[None]:
    """The store to this process alone: an exclusive flock on the directory (waits its turn)."""
    try:
        if not store_dir.is_dir():
            store_dir.mkdir(mode=0o755, parents=True)
            os.chmod(store_dir, 0o755)
        fd = os.open(store_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise StagingError(
            f"cannot open the model store {_path(store_dir)}: {exc.strerror}"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise StagingError(
                f"cannot lock the model store {_path(store_dir)}: {exc.strerror}"
            ) from None
        yield
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(store_dir: Path, final: Path) -> None:
    """Remove what interrupted runs left: staging directories, `.partial` files in `final`."""
    try:
        for child in store_dir.iterdir():
            if _STAGING_DIR.match(child.name) and child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
        if final.is_dir():
            for top, _dirs, files in os.walk(final):
                for name in files:
                    if _PARTIAL.match(name):
                        os.unlink(os.path.join(top, name))
    except OSError as exc:
        raise StagingError(
            f"cannot remove a temporary left by an earlier run in {_path(store_dir)}: "
            f"{exc.strerror} ({printable(str(exc.filename))})"
        ) from None


def _make_dirs(root: Path, directory: Path) -> list[Path]:
    """Create `directory` below `root` (which exists), mode 0755; those made, outermost first."""
    made: list[Path] = []
    for part in reversed([directory, *directory.parents]):
        if part == root or root not in part.parents:
            continue
        if not part.is_dir():
            try:
                part.mkdir(mode=0o755)
                os.chmod(part, 0o755)
            except OSError as exc:
                for done in reversed(made):
                    with contextlib.suppress(OSError):
                        done.rmdir()
                raise StagingError(f"cannot create {_path(part)}: {_os_problem(exc)}") from None
            made.append(part)
    return made


def _os_problem(exc: OSError) -> str:
    if exc.errno in {errno.ENOSPC, errno.EDQUOT}:
        return f"no space left on the device ({exc.strerror}: its blocks or inodes are full)"
    return exc.strerror or str(exc)


def copy_from(source_dir: Path) -> Fetch:
    """A Fetch copying each file from `source_dir`, a checkpoint directory on this machine."""

    def fetch(entry: FileEntry, target: Path) -> None:
        source = source_dir / entry.path
        shutil.copyfile(source, target)
        try:
            now: int | None = source.stat().st_size
        except OSError:
            now = None
        if now != entry.size:
            now_text = "gone" if now is None else f"{now:,} bytes"
            raise StagingError(
                f"{printable(entry.path)} changed during the copy: {entry.size:,} bytes when "
                f"listed, now {now_text}"
            )

    return fetch


def _copy_file(fetch: Fetch, target: Path, entry: FileEntry) -> None:
    """Fetch `entry` to `target` (mode 0644, flushed to disk) and verify it against `entry`.

    On any failure `target` is removed and a StagingError names the file; the caller adds the
    node and model.
    """
    name = printable(entry.path)
    try:
        fetch(entry, target)
        os.chmod(target, 0o644)
        _fsync(target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise StagingError(f"copying {name} to {_path(target)}: {_os_problem(exc)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise
    problem = verify_file(target, entry)
    if problem is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(target)
    raise StagingError(
        f"the copy of {problem}; the source may be damaged (check it with "
        "`sha256sum -c SHA256SUMS` in its directory)"
    )


def _check_space(store_dir: Path, entries: list[FileEntry]) -> None:
    """Raise DiskSpaceError when the store cannot take `entries` plus SPACE_MARGIN_BYTES."""
    try:
        block = os.statvfs(store_dir).f_frsize or 4096
        free = shutil.disk_usage(store_dir).free
    except OSError as exc:
        raise StagingError(f"cannot stat {_path(store_dir)}: {exc.strerror}") from None
    to_copy = sum(-(-entry.size // block) * block for entry in entries)
    needed = to_copy + SPACE_MARGIN_BYTES
    if free >= needed:
        return
    raise DiskSpaceError(
        f"not enough space in {_path(store_dir)}: {amount(needed - free)} "
        f"short. Staging needs {amount(needed)}, {amount(to_copy)} for {len(entries)} files "
        f"(in whole {block}-byte blocks) and {amount(SPACE_MARGIN_BYTES)} kept free; "
        f"{amount(free)} is free. Nothing was written: free space there, or place the model "
        "on another node"
    )


def _stage_new(fetch: Fetch, store_dir: Path, final: Path, manifest: Manifest) -> None:
    """Copy the whole checkpoint into a temporary sibling of `final`, then rename it into place."""
    temporary = store_dir / f".staging-{final.name}-{os.getpid()}"
    try:
        _make_dirs(store_dir, temporary)
        for entry in manifest.entries:
            target = temporary / entry.path
            _make_dirs(temporary, target.parent)
            _copy_file(fetch, target, entry)
        for top, _dirs, _files in os.walk(temporary, topdown=False):
            _fsync(Path(top))
        try:
            os.rename(temporary, final)
            _fsync(store_dir)
        except OSError as exc:
            raise StagingError(
                f"cannot rename {_path(temporary)} to {_path(final)}: {_os_problem(exc)}"
            ) from None
    except BaseException as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(exc, StagingError):
            raise StagingError(f"{exc}; nothing of it was left in {_path(store_dir)}") from None
        raise


def _repair(fetch: Fetch, final: Path, entry: FileEntry) -> None:
    """Replace one file of `final` by a verified copy, through `.<file>.partial` beside it."""
    target = final / entry.path
    partial = target.with_name(f".{target.name}.partial")
    made = _make_dirs(final, target.parent)
    try:
        _copy_file(fetch, partial, entry)
        try:
            os.replace(partial, target)
            _fsync(target.parent)
        except OSError as exc:
            raise StagingError(f"cannot replace {_path(target)}: {_os_problem(exc)}") from None
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()
        if isinstance(exc, StagingError):
            raise StagingError(
                f"{exc}; its partial copy was removed, the files repaired before it are in place"
            ) from None
        raise


def stage_from_directory(
    source_dir: Path, store_dir: Path, model: str, *, node: str
) -> StageResult:
    """Put the checkpoint in `source_dir` (on this machine) into the store: `stage` with a copy."""
    with _named(node, model):
        manifest = read_manifest(source_dir, model)
    return stage(manifest, copy_from(source_dir), store_dir, node=node)


def stage(manifest: Manifest, fetch: Fetch, store_dir: Path, *, node: str) -> StageResult:
    """Put the checkpoint `manifest` lists into the store as `store_dir / model_dir_name(model)`.

    `fetch` writes one file's bytes to a path (a local copy, or chunks from another node).
    Copies only the files missing or failing `verify_file` at the destination (all of them the
    first time, through a temporary directory renamed into place), after checking the store's
    free space. Files there that the checkpoint lacks are reported, not deleted. Raises
    DiskSpaceError when the copy cannot fit, StagingError on any other failure; either way no
    partial file or directory is left under a final name.
    """
    model = manifest.model
    with _named(node, model):
        final = store_dir / model_dir_name(model)
        with _locked(store_dir):
            _remove_stale(store_dir, final)
            if final.is_symlink() or (final.exists() and not final.is_dir()):
                raise StagingError(f"{_path(final)} is a link or not a directory; move it away")
            first = not final.exists()
            bad = [e for e in manifest.entries if first or verify_file(final / e.path, e)]
            if bad:
                _check_space(store_dir, bad)
            if first:
                _stage_new(fetch, store_dir, final, manifest)
            else:
                for entry in bad:
                    _repair(fetch, final, entry)
            extra = _extra_files(final, manifest)
    return StageResult(
        model=model,
        node=node,
        path=final,
        copied_files=len(bad),
        copied_bytes=sum(entry.size for entry in bad),
        kept_files=len(manifest.entries) - len(bad),
        extra_files=extra,
    )


def _extra_files(directory: Path, manifest: Manifest) -> tuple[str, ...]:
    known = {entry.path for entry in manifest.entries}
    return tuple(path for path in listed_files(directory) if path not in known)


def check_in_place(
    directory: Path, model: str, *, node: str, manifest: Manifest | None = None
) -> StageResult:
    """Verify a checkpoint where it is served from (a shared filesystem); nothing is copied.

    Against `manifest`, or the directory's own listing and SHA256SUMS when none is given.
    Raises StagingError listing every problem.
    """
    with _named(node, model):
        if manifest is None:
            manifest = read_manifest(directory, model)
        problems = verify_model(directory, manifest)
        if problems:
            raise StagingError(problems_message(f"{_path(directory)} does not verify", problems))
        extra = _extra_files(directory, manifest)
    return StageResult(
        model=model,
        node=node,
        path=directory,
        copied_files=0,
        copied_bytes=0,
        kept_files=len(manifest.entries),
        extra_files=extra,
    )
