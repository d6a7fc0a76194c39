"""The API key file on the head: read, changed under a lock, and watched by the ingress.

The file holds `deployer.config.api_keys.KeyRing`'s document: names, SHA-256 digests and
allow-lists, never a key itself. It is written whole to a temporary file of mode 0600 and
renamed over the old one, so a reader sees the old ring or the new one, never half of one.
The ingress rereads it when it changes (`KeyFileWatcher`), so `rackserve keys revoke` takes
effect on the next request with no restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from deployer.config.api_keys import KeyRing, key_ring
from deployer.errors import ConfigError, ExitCode, RackserveError
from deployer.serving.state import write_atomically

DEFAULT_KEY_FILE = Path("/etc/rackserve/api-keys.json")
log = logging.getLogger(__name__)


class KeyFileError(RackserveError):
    """The key file cannot be read, written or locked, or others may read it: fix the file."""

    exit_code = ExitCode.BAD_INPUT


def read_keys(path: Path) -> KeyRing:
    """The key ring in `path`; a file readable by others than its owner is refused."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"the key file {path} has mode {stat.S_IMODE(mode):o}: others may read it; "
            f"run `chmod 600 {path}`"
        )
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"not JSON: {exc}", source=f"key file {path}") from exc
    return key_ring(document, f"key file {path}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise KeyFileError(f"cannot lock the key file {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def change_keys(path: Path, change: Callable[[KeyRing], KeyRing]) -> KeyRing:
    """Apply `change` to the ring in `path` (empty if there is none) and write it, mode 0600.

    Under a lock, so two `rackserve keys` commands never lose each other's change. A change
    that raises leaves the file as it was.
    """
    with _locked(path):
        ring = read_keys(path) if path.exists() else KeyRing()
        changed = change(ring)
        data = json.dumps(changed.to_document(), indent=2).encode() + b"\n"
        try:
            write_atomically(path, data)
        except OSError as exc:
            raise KeyFileError(f"cannot write the key file {path}: {exc.strerror}") from exc
    return changed


class KeyFileWatcher:
    """The ring in a key file, reread whenever the file changes (checked at most every call).

    A missing or broken file does not open the endpoint: a missing file is an empty ring (every
    key refused), and a file that fails to parse keeps the last ring read, logged once per
    change.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._ring = KeyRing()

    def current(self) -> KeyRing:
        """The ring as the file holds it now."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            self._seen, self._ring = None, KeyRing()
            return self._ring
        seen = (info.st_ino, info.st_mtime_ns, info.st_size)
        if seen != self._seen:
            self._seen = seen
            try:
                self._ring = read_keys(self.path)
            except RackserveError as exc:
                log.error("key file unchanged in use, the new one is refused: %s", exc)
        return self._ring
