"""One cgroup per host on the outer machine, so that each host's systemd owns its own tree.

Hybrid layout (v1 controllers, v2 at /sys/fs/cgroup/unified): a directory in the v2 tree and
one in the v1 `name=systemd` tree. Pure v2: one directory under /sys/fs/cgroup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from tools.rackbox.errors import RackUnavailable
from tools.rackbox.spec import cgroup_name

CGROUP_ROOT = Path("/sys/fs/cgroup")


def hierarchies(root: Path = CGROUP_ROOT) -> tuple[Path, ...]:
    """The cgroup trees a host's directory goes in, the v2 tree first."""
    if (root / "cgroup.controllers").is_file():
        return (root,)
    if (root / "unified" / "cgroup.controllers").is_file() and (root / "systemd").is_dir():
        return (root / "unified", root / "systemd")
    raise RackUnavailable(f"no cgroup v2 hierarchy at {root} or {root}/unified")


def host_cgroups(host: str) -> tuple[Path, ...]:
    """The host's cgroup directories, v2 first."""
    return tuple(tree / cgroup_name(host) for tree in hierarchies())


def create(host: str) -> tuple[Path, ...]:
    """Create the host's cgroup directories (kept if there) and return them."""
    paths = host_cgroups(host)
    for path in paths:
        path.mkdir(exist_ok=True)
    return paths


def pids(path: Path) -> list[int]:
    """Every process in the cgroup at `path` and below."""
    found: list[int] = []
    if not path.is_dir():
        return found
    for procs in path.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            found += [int(pid) for pid in procs.read_text().split()]
    return found


def kill(path: Path) -> None:
    """SIGKILL every process in the cgroup at `path` and below (all of them the host's)."""
    kill_file = path / "cgroup.kill"
    if kill_file.is_file():
        with contextlib.suppress(OSError):
            kill_file.write_text("1")
            return
    for pid in pids(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def remove(path: Path, timeout_s: float = 5.0) -> None:
    """Remove the cgroup directory tree at `path`, deepest first (cgroups go by rmdir)."""
    deadline = time.monotonic() + timeout_s
    while path.is_dir():
        dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        try:
            for directory in [*dirs, path]:
                directory.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            kill(path)  # processes left in it (EBUSY): they are this host's
            time.sleep(0.1)
