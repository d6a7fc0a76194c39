"""What a rack is made of: names, addresses and paths, derived from a few settings (pure)."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_CACHE_ROOT = Path("/var/cache/rackserve")
DEFAULT_PREFIX = "rb"
DEFAULT_NETWORK = "10.231.0.0/24"
FIRST_HOST_OCTET = 21  # hosts are .21, .22, ...; the bridge (the outer machine) is .1
MAX_HOSTS = 32
WHEELHOUSE_MOUNT = "/srv/wheelhouse"
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")  # bridge "<prefix>br0" fits in 15 characters


def default_cache_dir() -> Path:
    """The harness's cache: `$RACKSERVE_CACHE/rackbox`, default /var/cache/rackserve/rackbox."""
    return Path(os.environ.get("RACKSERVE_CACHE") or DEFAULT_CACHE_ROOT) / "rackbox"


@dataclass(frozen=True)
class HostSpec:
    """One host of the rack: its name (hostname, machine and inventory name), address and role."""

    name: str
    ip: str
    role: Literal["head", "worker"]


@dataclass(frozen=True)
class RackSpec:
    """The settings of one rack; everything else (names, addresses, paths) derives from them."""

    hosts: int = 3
    prefix: str = DEFAULT_PREFIX
    network: str = DEFAULT_NETWORK
    cache_dir: Path = Path()  # empty: default_cache_dir()
    wheelhouse: Path | None = None  # None: $RACKSERVE_WHEELHOUSE, else an empty directory

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise ValueError(
                f"name prefix {self.prefix!r}: 1-8 of [a-z0-9], starting with a letter"
            )
        if not 1 <= self.hosts <= MAX_HOSTS:
            raise ValueError(f"hosts: {self.hosts}; a rack has 1 to {MAX_HOSTS} hosts")
        net = ipaddress.IPv4Network(self.network)
        if net.prefixlen > 24:
            raise ValueError(f"network {self.network}: needs a /24 or larger")
        if self.cache_dir == Path():
            object.__setattr__(self, "cache_dir", default_cache_dir())
        if self.wheelhouse is None and os.environ.get("RACKSERVE_WHEELHOUSE"):
            object.__setattr__(self, "wheelhouse", Path(os.environ["RACKSERVE_WHEELHOUSE"]))

    @property
    def bridge(self) -> str:
        """The bridge the hosts' veths join."""
        return f"{self.prefix}br0"

    @property
    def bridge_interface(self) -> str:
        """The outer machine's address on the bridge, with prefix: 10.231.0.1/24."""
        net = ipaddress.IPv4Network(self.network)
        return f"{net.network_address + 1}/{net.prefixlen}"

    @property
    def host_specs(self) -> tuple[HostSpec, ...]:
        """The hosts, head first: <prefix>-head, <prefix>-worker-1, ..."""
        base = ipaddress.IPv4Network(self.network).network_address + FIRST_HOST_OCTET
        return tuple(
            HostSpec(
                name=f"{self.prefix}-head" if i == 0 else f"{self.prefix}-worker-{i}",
                ip=str(base + i),
                role="head" if i == 0 else "worker",
            )
            for i in range(self.hosts)
        )

    @property
    def rack_dir(self) -> Path:
        """Where this rack's state, inventory, console logs and overlay layers live."""
        return rack_dir(self.cache_dir, self.prefix)

    @property
    def wheelhouse_dir(self) -> Path:
        """The directory bind-mounted read-only at /srv/wheelhouse in every host."""
        return (self.wheelhouse or self.rack_dir / "wheelhouse").resolve()


def rack_dir(cache_dir: Path, prefix: str) -> Path:
    """The directory of the rack named by `prefix` under a cache dir."""
    return cache_dir / "racks" / prefix


def cgroup_name(host: str) -> str:
    """The host's cgroup directory name on the outer machine."""
    return f"rackbox-{host}"
