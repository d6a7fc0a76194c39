"""What a rack started, on disk, so that `down` can undo it after a crash."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "state.json"


@dataclass
class HostState:
    """One host: its overlay directories, cgroups and nspawn process (PID and start time)."""

    name: str
    ip: str
    directory: str  # upper/, work/ and root/ (the overlay mount)
    cgroups: list[str] = field(default_factory=list)
    pid: int | None = None
    start_time: int | None = None  # /proc/PID/stat field 22: tells a reused PID apart

    @property
    def root(self) -> Path:
        """The overlay mount: the host's root filesystem as seen from outside."""
        return Path(self.directory) / "root"

    @property
    def console_log(self) -> Path:
        """systemd-nspawn's output, the host's console: kept after `down`, until the next `up`."""
        return Path(self.directory).parent.parent / "logs" / f"{self.name}.console.log"


@dataclass
class RackState:
    """One rack: its bridge, base image, inventory and hosts (head first)."""

    prefix: str
    network: str
    bridge: str
    base: str = ""
    wheelhouse: str = ""
    inventory: str = ""
    private_key: str = ""
    owner_pid: int | None = None  # the process that ran `up` (gone after `up --keep`)
    owner_start_time: int | None = None
    hosts: list[HostState] = field(default_factory=list)

    def save(self, rack_dir: Path) -> None:
        """Write the state file atomically."""
        rack_dir.mkdir(parents=True, exist_ok=True)
        tmp = rack_dir / f".{STATE_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(rack_dir / STATE_FILE)

    @classmethod
    def load(cls, rack_dir: Path) -> RackState | None:
        """The rack's saved state, or None when there is none."""
        path = rack_dir / STATE_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        hosts = [HostState(**host) for host in data.pop("hosts")]
        return cls(**data, hosts=hosts)


def forget(rack_dir: Path) -> None:
    """Remove the state file (the rack is down)."""
    (rack_dir / STATE_FILE).unlink(missing_ok=True)
