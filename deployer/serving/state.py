"""What rackserve deployed last: in the Ray cluster, and on the head's disk.

The record (`deployer.planning.redeploy.Deployed`) is kept in two stores behind one interface
(`StateStore`): the Ray cluster's key-value store (the GCS), which any `rackserve` that reaches
the cluster can read, and a directory on disk (`FileStateStore`), written atomically, with an
event log and a lock, which outlives the cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from deployer.errors import RackserveError, printable
from deployer.planning.redeploy import Deployed

KV_NAMESPACE = "rackserve"
KV_KEY = b"deployment"


class StateStore(Protocol):
    """Reads and replaces the deployed record."""

    def read(self) -> Deployed | None:
        """The record, or None when nothing is deployed."""

    def write(self, deployed: Deployed | None) -> None:
        """Replace the record; None forgets it."""


class RayKvStore:
    """The record in Ray's internal key-value store; needs a connected Ray driver."""

    def read(self) -> Deployed | None:
        """The record, or None when nothing is deployed."""
        from ray.experimental import internal_kv

        value = internal_kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
        return Deployed.from_bytes(value if isinstance(value, bytes) else None)

    def write(self, deployed: Deployed | None) -> None:
        """Replace the record; None forgets it."""
        from ray.experimental import internal_kv

        if deployed is None:
            internal_kv._internal_kv_del(KV_KEY, namespace=KV_NAMESPACE)
        else:
            internal_kv._internal_kv_put(KV_KEY, deployed.to_bytes(), namespace=KV_NAMESPACE)


DEFAULT_STATE_DIR = Path("/var/lib/rackserve/state")
STATE_FILE = "deployed.json"
EVENTS_FILE = "events.jsonl"
LOCK_FILE = "lock"
MAX_EVENTS_BYTES = 4 * 1024 * 1024
"""The event log is cut to its newer half when it grows past this."""


class StateError(RackserveError):
    """The state directory cannot be read, written or locked."""


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash at any point leaves the old or the new file.

    Written to a temporary file in the same directory, flushed to disk, renamed over `path`
    (atomic on POSIX), and the directory flushed so the rename itself survives a power loss.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class FileStateStore:
    """The record in a directory on disk (the head's `/var/lib/rackserve/state`), crash-safe."""

    def __init__(self, directory: Path = DEFAULT_STATE_DIR) -> None:
        self.directory = directory

    def _ready(self) -> Path:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"cannot create the state directory {printable(str(self.directory))}: "
                f"{exc.strerror}; run as a user who may write there, or pass --state-dir"
            ) from None
        return self.directory

    def read(self) -> Deployed | None:
        """The record, or None when nothing is deployed (or no state was ever written)."""
        path = self.directory / STATE_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {printable(str(path))}: {exc.strerror}") from None
        try:
            return Deployed.from_bytes(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"{printable(str(path))} is not a rackserve state file ({exc}); move it away "
                "and run `rackserve deploy` again"
            ) from None

    def write(self, deployed: Deployed | None) -> None:
        """Replace the record atomically; None forgets it."""
        path = self._ready() / STATE_FILE
        if deployed is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        write_atomically(path, deployed.to_bytes())

    def record(self, kind: str, **details: Any) -> None:
        """Append one event (a JSON line with a UTC timestamp) to the event log."""
        path = self._ready() / EVENTS_FILE
        line = json.dumps(
            {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "event": kind}
            | details,
            sort_keys=False,
            default=str,
        )
        with path.open("ab+") as handle:
            if handle.tell() > 0:  # after a crash mid-append, start on a line of its own
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
            handle.write(line.encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        if path.stat().st_size > MAX_EVENTS_BYTES:
            kept = path.read_bytes()[-MAX_EVENTS_BYTES // 2 :]
            write_atomically(path, kept[kept.find(b"\n") + 1 :])

    def events(self, last: int = 20) -> list[dict[str, Any]]:
        """The last `last` events, oldest first; lines that do not parse are skipped."""
        path = self.directory / EVENTS_FILE
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        found: list[dict[str, Any]] = []
        for line in reversed(lines):
            if len(found) == last:
                break
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found[::-1]

    @contextlib.contextmanager
    def lock(self, wait_s: float = 0.0) -> Iterator[None]:
        """Hold the state's lock: one deploy or controller pass acts at a time.

        Waits up to `wait_s` for another holder, then raises StateError naming it. The lock is
        the kernel's (flock), so a holder that dies releases it.
        """
        path = self._ready() / LOCK_FILE
        with path.open("a+") as handle:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        handle.seek(0)
                        holder = handle.read(200).strip() or "another process"
                        raise StateError(
                            f"{printable(holder)} is changing the deployment "
                            f"(lock {printable(str(path))}); wait for it to finish and run "
                            "this again"
                        ) from None
                    time.sleep(0.2)
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} ({' '.join(sys.argv[:2])})\n")
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class MirroredStore:
    """The Ray record mirrored on disk: the disk copy outlives the cluster, the KV any node reads.

    Reads prefer the cluster's record (what runs now) and fall back to the disk's; writes go to
    the disk first, so the durable copy is never older than the cluster's.
    """

    def __init__(self, cluster: StateStore, disk: FileStateStore) -> None:
        self.cluster = cluster
        self.disk = disk

    def read(self) -> Deployed | None:
        """The cluster's record, else the disk's."""
        return self.cluster.read() or self.disk.read()

    def write(self, deployed: Deployed | None) -> None:
        """Replace both records, the disk's first."""
        self.disk.write(deployed)
        self.cluster.write(deployed)


def deployed_store(state_dir: Path | None) -> StateStore:
    """Where the record is kept: the cluster's store, mirrored in `state_dir` when given."""
    return MirroredStore(RayKvStore(), FileStateStore(state_dir)) if state_dir else RayKvStore()
