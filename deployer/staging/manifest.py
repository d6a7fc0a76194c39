"""What a checkpoint directory holds: its files, their sizes and, when given, their SHA-256.

`read_manifest` lists the regular files of a checkpoint directory (hidden names such as `.git`,
`.cache` and staging's own temporaries left out) and attaches the digests of a `SHA256SUMS`
file, in the format `sha256sum` writes, when the directory has one. Also the errors of staging:
`StagingError` (an I/O failure) and `StagingInputError` (a bad manifest or model id).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from deployer.errors import MAX_PROBLEMS, ExitCode, RackserveError, printable, shown

SUMS_FILE = "SHA256SUMS"
"""The digests file a checkpoint may carry: `<64 hex digits>  <relative path>` per line."""

_SUMS_LIMIT = 16 * 1024 * 1024  # a SHA256SUMS of 100,000 files is ~10 MB
_SUMS_LINE = re.compile(r"^(\\?)([0-9a-fA-F]{64}) [ *](.+)$", re.DOTALL)
_TEMPORARY = re.compile(r"^\.staging-.+-\d+$|^\..+\.partial$")


class StagingError(RackserveError):
    """Staging failed on a node (I/O, damaged files, no space): the message names what."""

    exit_code = ExitCode.FAILURE


class StagingInputError(StagingError):
    """Staging was given bad input: a malformed SHA256SUMS, a path leaving the checkpoint."""

    exit_code = ExitCode.BAD_INPUT


def is_temporary(name: str) -> bool:
    """Whether a file or directory name is one of staging's temporaries."""
    return _TEMPORARY.match(name) is not None


def relative_path_problem(path: str) -> str | None:
    """Why `path` is not a plain relative path inside a directory; None when it is."""
    if not path or "\x00" in path:
        return "is empty or holds a NUL character"
    if path.startswith("/"):
        return "is absolute"
    parts = PurePosixPath(path).parts
    if ".." in parts:
        return "leaves the directory (`..`)"
    if not parts:
        return "names the directory itself"
    return None


def problems_message(head: str, problems: list[str]) -> str:
    """`head`, then one line per problem (at most MAX_PROBLEMS, the rest counted)."""
    lines = [printable(p) for p in problems[:MAX_PROBLEMS]]
    if len(problems) > MAX_PROBLEMS:
        lines.append(f"... and {len(problems) - MAX_PROBLEMS} more problems")
    return head + ":\n" + "\n".join(f"  - {line}" for line in lines)


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: relative path (`/`-separated), size, SHA-256 if listed.

    The digest is lower-case hex, from the checkpoint's SHA256SUMS; None when it has none.
    """

    path: str
    size: int
    sha256: str | None = None

    def __post_init__(self) -> None:
        problem = relative_path_problem(self.path)
        if problem:
            raise StagingInputError(f"file path {shown(self.path)} {problem}")
        if self.size < 0:
            raise StagingInputError(f"{shown(self.path)}: negative size {self.size}")


@dataclass(frozen=True)
class Manifest:
    """The files of one model's checkpoint, sorted by path."""

    model: str
    entries: tuple[FileEntry, ...]

    @property
    def total_bytes(self) -> int:
        """The checkpoint's size: every file's bytes."""
        return sum(entry.size for entry in self.entries)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def listed_files(directory: Path) -> list[str]:
    """Relative paths of everything under `directory` that is not a directory and not hidden.

    Links to directories are neither followed nor listed; links to files are listed.
    """
    found: list[str] = []

    def refuse(exc: OSError) -> None:
        raise StagingError(f"cannot list {printable(str(exc.filename))}: {exc.strerror}")

    for top, dirs, files in os.walk(directory, onerror=refuse):
        here = Path(top)
        dirs[:] = sorted(d for d in dirs if not _hidden(d) and not (here / d).is_symlink())
        found.extend(
            (here / name).relative_to(directory).as_posix() for name in files if not _hidden(name)
        )
    return sorted(found)


def _links_to_directories(directory: Path) -> list[str]:
    links: list[str] = []
    for top, dirs, _files in os.walk(directory):
        here = Path(top)
        for name in dirs:
            if not _hidden(name) and (here / name).is_symlink():
                links.append((here / name).relative_to(directory).as_posix())
        dirs[:] = [d for d in dirs if not _hidden(d) and not (here / d).is_symlink()]
    return links


def _file_size(root: Path, relative: str) -> int:
    """The size of a regular file inside `root`, following links that stay inside it."""
    path = root / relative
    where = f"{printable(str(path))}"
    try:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            target = path.resolve()
            if not target.is_relative_to(root.resolve()):
                raise StagingInputError(
                    f"{where} is a link to {printable(str(target))}, outside the checkpoint "
                    f"{printable(str(root))}; copy the file in, or stage from its directory"
                )
            info = path.stat()
    except FileNotFoundError:
        raise StagingInputError(f"{where} is missing (or a broken link)") from None
    except OSError as exc:
        raise StagingError(f"cannot read {where}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise StagingInputError(f"{where} is not a regular file")
    return info.st_size


def _unescape(path: str) -> str | None:
    r"""A file name from an escaped SHA256SUMS line (`\\` and `\n`); None when malformed."""
    out: list[str] = []
    chars = iter(path)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        follower = next(chars, "")
        if follower == "\\":
            out.append("\\")
        elif follower == "n":
            out.append("\n")
        elif follower == "r":
            out.append("\r")
        else:
            return None
    return "".join(out)


def read_sums(sums: Path) -> dict[str, tuple[str, int]]:
    r"""Relative path -> (SHA-256 in lower-case hex, line number) from a SHA256SUMS file.

    The lines `sha256sum` writes, text (`  `) or binary (` *`) mode, escaped names (a leading
    `\`) included; blank lines are skipped. Each bad line is refused with its number.
    """
    where = printable(str(sums))
    try:
        with sums.open("rb") as handle:
            raw = handle.read(_SUMS_LIMIT + 1)
    except OSError as exc:
        raise StagingError(f"cannot read {where}: {exc.strerror}") from None
    if len(raw) > _SUMS_LIMIT:
        raise StagingInputError(f"{where} is larger than {_SUMS_LIMIT:,} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StagingInputError(f"{where}: not UTF-8 at byte {exc.start}") from None
    digests: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")  # noqa: PLW2901 - a file written on Windows
        if not line.strip():
            continue
        match = _SUMS_LINE.match(line)
        name = None
        if match:
            name = _unescape(match.group(3)) if match.group(1) else match.group(3)
        if match is None or name is None:
            raise StagingInputError(
                f"{where} line {number}: expected '<64 hex digits>  <relative path>' "
                f"(as sha256sum writes), got {shown(line)}"
            )
        problem = relative_path_problem(name)
        if problem:
            raise StagingInputError(f"{where} line {number}: the path {shown(name)} {problem}")
        relative = PurePosixPath(name).as_posix()
        if relative == SUMS_FILE or any(is_temporary(p) for p in PurePosixPath(relative).parts):
            raise StagingInputError(
                f"{where} line {number}: {shown(name)} cannot be listed (it is SHA256SUMS "
                "itself, or a staging temporary)"
            )
        if relative in digests:
            raise StagingInputError(
                f"{where} line {number}: {shown(name)} is listed twice "
                f"(also line {digests[relative][1]})"
            )
        digests[relative] = (match.group(2).lower(), number)
    return digests


def read_manifest(source_dir: Path, model: str) -> Manifest:
    """The files of the checkpoint in `source_dir`, with digests from its SHA256SUMS if any.

    Every regular file below the directory except hidden ones; files that SHA256SUMS lists
    must exist (hidden ones too, then they are part of the checkpoint). Links to files inside
    the directory are followed; a link leading outside it, or to a directory, is refused.
    """
    where = printable(str(source_dir))
    if not source_dir.is_dir():
        raise StagingError(f"the checkpoint directory {where} does not exist or is not one")
    links = _links_to_directories(source_dir)
    if links:
        raise StagingInputError(
            f"{where}: {shown(links[0])} is a link to a directory; staging follows links to "
            "files only"
        )
    sums_path = source_dir / SUMS_FILE
    sums = read_sums(sums_path) if sums_path.is_file() else {}
    names = set(listed_files(source_dir))
    for relative, (_digest, number) in sums.items():
        if relative not in names and not os.path.lexists(source_dir / relative):
            raise StagingInputError(
                f"{printable(str(sums_path))} line {number}: lists {shown(relative)}, which is "
                f"not in {where}"
            )
    digests = {relative: digest for relative, (digest, _number) in sums.items()}
    entries = tuple(
        FileEntry(relative, _file_size(source_dir, relative), digests.get(relative))
        for relative in sorted(names | set(sums))
    )
    if not entries:
        raise StagingInputError(f"{where} holds no files to stage")
    return Manifest(model=model, entries=entries)
