"""A rack-in-a-box: boot N Debian hosts with systemd-nspawn on a bridge; tear them down."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tools.rackbox import cgroup, image, nspawn
from tools.rackbox.errors import RackBootError, RackError, RackUnavailable
from tools.rackbox.inventory import inventory_data, write_inventory
from tools.rackbox.network import bridge_down, bridge_exists, bridge_up
from tools.rackbox.spec import (
    DEFAULT_NETWORK,
    DEFAULT_PREFIX,
    WHEELHOUSE_MOUNT,
    HostSpec,
    RackSpec,
    cgroup_name,
    rack_dir,
)
from tools.rackbox.ssh import ensure_keypair, ssh, wait_for_ssh
from tools.rackbox.state import HostState, RackState, forget
from tools.rackbox.system import (
    configured_sources,
    debian_mirror,
    ensure_host_packages,
    mounts_under,
    require_root,
)

INVENTORY_FILE = "hosts.yml"


def check_machine() -> None:
    """Raise RackUnavailable unless this machine can run the rack (root, cgroup v2, overlayfs)."""
    require_root()
    cgroup.hierarchies()
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise RackUnavailable("the kernel has no overlayfs (modprobe overlay?)")


@contextlib.contextmanager
def rack_lock(cache_dir: Path, prefix: str) -> Iterator[None]:
    """Hold the rack's lock: one `up` or `down` of a rack at a time."""
    with image.locked(rack_dir(cache_dir, prefix).with_suffix(".lock")):
        yield


class Rack:
    """N hosts booted from one Debian image: `with Rack(hosts=3) as rack: rack.ssh(...)`.

    The first host is the head (`<prefix>-head`), the others workers (`<prefix>-worker-N`).
    `keep=True` leaves the hosts running when the `with` block ends. `replace=True` lets `up`
    tear down a rack of the same prefix left running, unless the process that booted it lives.
    `packages` go into the base image beside the defaults, `prefetch` .debs into its apt cache
    (for `apt install` on the offline hosts); either changes the image's cache key.
    `binds` maps directories of this machine to paths inside every host, mounted read-only
    (e.g. `{models_dir: "/srv/models"}`). With a `wheelhouse` (or $RACKSERVE_WHEELHOUSE) the
    inventory sets `python_env_wheelhouse: /srv/wheelhouse`, so the python_env role installs
    from it offline.
    """

    def __init__(
        self,
        hosts: int = 3,
        *,
        prefix: str = DEFAULT_PREFIX,
        network: str = DEFAULT_NETWORK,
        cache_dir: Path | None = None,
        wheelhouse: Path | None = None,
        keep: bool = False,
        boot_timeout_s: float = 120.0,
        stop_timeout_s: float = 30.0,
        inventory_vars: Mapping[str, Any] | None = None,
        replace: bool = False,
        packages: Sequence[str] = (),
        prefetch: Sequence[str] = (),
        binds: Mapping[Path | str, str] | None = None,
    ) -> None:
        self.spec = RackSpec(hosts, prefix, network, cache_dir or Path(), wheelhouse)
        self.binds = check_binds(binds or {})
        self.keep = keep
        self.replace = replace
        self.packages, self.prefetch = tuple(packages), tuple(prefetch)
        self.boot_timeout_s = boot_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.inventory_vars = dict(inventory_vars or {})
        self.timings: dict[str, float] = {}
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def hosts(self) -> tuple[HostSpec, ...]:
        """The hosts, head first, each with `.name`, `.ip` and `.role`."""
        return self.spec.host_specs

    @property
    def inventory(self) -> Path:
        """The Ansible inventory `up` writes for this rack."""
        return self.spec.rack_dir / INVENTORY_FILE

    @property
    def private_key(self) -> Path:
        """The SSH key that logs in as root on every host."""
        return self.spec.cache_dir / "ssh" / "id_ed25519"

    def __enter__(self) -> Rack:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.keep:
            self.down()

    def host(self, which: str | HostSpec) -> HostSpec:
        """A host by name or address."""
        if isinstance(which, HostSpec):
            return which
        for host in self.hosts:
            if which in (host.name, host.ip):
                return host
        raise KeyError(f"no host {which!r} in rack {self.spec.prefix!r}")

    def ssh(
        self, host: str | HostSpec, command: str, *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command as root on a host over SSH; `check` raises on a non-zero exit."""
        return ssh(self.private_key, self.host(host).ip, command, check=check, timeout=timeout)

    def write_inventory(
        self,
        path: Path | None = None,
        extra_vars: Mapping[str, Any] | None = None,
        hosts: Sequence[HostSpec] | None = None,
    ) -> Path:
        """Write an inventory for the rack (default: `.inventory`), `extra_vars` in `all.vars`.

        `hosts`: the hosts it lists (default: all; the first is the head), e.g. all but one that
        a test adds later with playbooks/scale.yml.
        """
        offline = {"python_env_wheelhouse": WHEELHOUSE_MOUNT} if self.spec.wheelhouse else {}
        variables = {**offline, **self.inventory_vars, **(extra_vars or {})}
        data = inventory_data(hosts or self.hosts, self.private_key, variables)
        return write_inventory(path or self.inventory, data)

    def up(self) -> Path:
        """Boot the hosts and wait for SSH on each; return the inventory's path."""
        check_machine()
        ensure_host_packages()
        cache, prefix = self.spec.cache_dir, self.spec.prefix
        with rack_lock(cache, prefix):
            old = RackState.load(self.spec.rack_dir)
            if old is not None:
                self._check_replaceable(old)
                self._teardown(old)  # what a crashed or kept run left
            started = time.monotonic()
            source = debian_mirror(image.SUITE, configured_sources())
            recipe = image.default_recipe(source, self.packages, self.prefetch)
            base, self.timings["base_build_s"] = image.ensure_base(cache, recipe)
            if self.timings["base_build_s"]:  # a new recipe: the older images are obsolete
                image.prune_bases(cache, keep={base.parent} | bases_in_use(cache))
            state = self._new_state(base)
            state.save(self.spec.rack_dir)
            try:
                self._boot(state)
            except BaseException:
                self._teardown(state)
                raise
            self.write_inventory()
            self.timings["up_s"] = time.monotonic() - started
        return self.inventory

    def down(self) -> None:
        """Stop the hosts, remove all the rack left; fine to call twice or after a crash."""
        require_root()
        started = time.monotonic()
        with rack_lock(self.spec.cache_dir, self.spec.prefix):
            state = RackState.load(self.spec.rack_dir) or RackState(
                self.spec.prefix, self.spec.network, self.spec.bridge
            )
            self._teardown(state)
        for process in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(1)
        self._processes.clear()
        self.timings["teardown_s"] = time.monotonic() - started

    def power_cut(self, which: str | HostSpec) -> None:
        """Cut a host's power: all its processes killed at once; its disk stays for `power_on`."""
        name = self.host(which).name
        with rack_lock(self.spec.cache_dir, self.spec.prefix):
            state, host = self._host_state(name)
            if not nspawn.is_running(host):
                raise RackError(f"{name} is not running")
            if not nspawn.power_cut(host):
                raise RackError(f"{name} still runs after SIGKILL of all its processes")
            host.pid = host.start_time = None
            state.save(self.spec.rack_dir)

    def power_on(self, which: str | HostSpec) -> None:
        """Boot a host whose power was cut, from its disk as it was, and wait for its SSH."""
        name = self.host(which).name
        with rack_lock(self.spec.cache_dir, self.spec.prefix):
            state, host = self._host_state(name)
            if nspawn.is_running(host):
                raise RackError(f"{name} is already running")
            wheelhouse = Path(state.wheelhouse)
            self._processes.append(nspawn.start(host, state.bridge, wheelhouse, self.binds))
            state.save(self.spec.rack_dir)
        running = functools.partial(nspawn.is_running, host)
        deadline = time.monotonic() + self.boot_timeout_s
        wait_for_ssh(Path(state.private_key), host.ip, deadline, running)

    def _host_state(self, name: str) -> tuple[RackState, HostState]:
        state = RackState.load(self.spec.rack_dir)
        if state is None:
            raise RackError(f"rack {self.spec.prefix!r} is not up")
        return state, next(h for h in state.hosts if h.name == name)

    def status(self) -> RackStatus:
        """What runs of this rack now, from its state file and the machine."""
        return rack_status(self.spec.cache_dir, self.spec.prefix)

    def _check_replaceable(self, old: RackState) -> None:
        prefix = old.prefix
        if old.owner_pid is not None and owner_alive(old):
            raise RackError(
                f"rack {prefix!r} is in use by PID {old.owner_pid}; pick another prefix"
            )
        if not self.replace and any(nspawn.is_running(h) for h in old.hosts):
            raise RackError(
                f"rack {prefix!r} is already up; "
                f"`python -m tools.rackbox down --name-prefix {prefix}` first"
            )

    def _new_state(self, base: Path) -> RackState:
        wheelhouse = self.spec.wheelhouse_dir
        if self.spec.wheelhouse is None:
            wheelhouse.mkdir(parents=True, exist_ok=True)
        elif not wheelhouse.is_dir():
            raise RackError(f"wheelhouse {wheelhouse} is not a directory")
        hosts_dir = self.spec.rack_dir / "hosts"
        return RackState(
            prefix=self.spec.prefix,
            network=self.spec.network,
            bridge=self.spec.bridge,
            base=str(base),
            wheelhouse=str(wheelhouse),
            inventory=str(self.inventory),
            private_key=str(ensure_keypair(self.private_key.parent)),
            owner_pid=os.getpid(),
            owner_start_time=nspawn.start_time(os.getpid()),
            hosts=[HostState(h.name, h.ip, str(hosts_dir / h.name)) for h in self.hosts],
        )

    def _boot(self, state: RackState) -> None:
        bridge_up(self.spec.bridge, self.spec.bridge_interface, self.spec.network)
        authorized = Path(state.private_key).with_suffix(".pub").read_text()
        for spec, host in zip(self.hosts, state.hosts, strict=True):
            nspawn.prepare(host, Path(state.base), nspawn.host_files(spec, self.hosts, authorized))
        started = time.monotonic()
        for host in state.hosts:
            wheelhouse = Path(state.wheelhouse)
            self._processes.append(nspawn.start(host, state.bridge, wheelhouse, self.binds))
            state.save(self.spec.rack_dir)
        deadline = started + self.boot_timeout_s
        for host in state.hosts:
            try:
                running = functools.partial(nspawn.is_running, host)
                wait_for_ssh(Path(state.private_key), host.ip, deadline, running)
            except RackBootError as exc:
                tail = host.console_log.read_text(errors="replace")[-2000:]
                if nspawn.is_running(host):
                    raise RackBootError(f"{host.name}: {exc}; its console:\n{tail}") from exc
                raise RackUnavailable(
                    f"systemd-nspawn cannot boot {host.name} here; its console:\n{tail}"
                ) from exc
        self.timings["boot_to_ssh_s"] = time.monotonic() - started

    def _teardown(self, state: RackState) -> None:
        hosts = {h.name: h for h in state.hosts}
        for name in leftover_hosts(self.spec.cache_dir, state.prefix):
            hosts.setdefault(name, HostState(name, "", str(self.spec.rack_dir / "hosts" / name)))
        for host in hosts.values():
            if not host.cgroups:
                with contextlib.suppress(RackUnavailable):
                    host.cgroups = [str(p) for p in cgroup.host_cgroups(host.name)]
            if host.pid is None:
                nspawn.adopt(host)
        nspawn.stop_all(list(hosts.values()), self.stop_timeout_s)
        for host in hosts.values():
            nspawn.clean(host)
        bridge_down(state.bridge or self.spec.bridge)
        self.inventory.unlink(missing_ok=True)
        forget(self.spec.rack_dir)


def check_binds(binds: Mapping[Path | str, str]) -> tuple[tuple[Path, str], ...]:
    """(outside, inside) pairs for nspawn's --bind-ro: existing directories, absolute paths."""
    checked = []
    for source, target in binds.items():
        outside = Path(source).resolve()
        if not outside.is_dir():
            raise RackError(f"bind mount {source}: not a directory")
        if not target.startswith("/") or target.rstrip("/") in ("", WHEELHOUSE_MOUNT):
            raise RackError(f"bind mount {source} -> {target!r}: needs an absolute path inside "
                            f"the host, other than / and {WHEELHOUSE_MOUNT}")  # fmt: skip
        if ":" in str(outside) + target:
            raise RackError(f"bind mount {source} -> {target}: no ':' in either path")
        checked.append((outside, target))
    return tuple(checked)


def owner_alive(state: RackState) -> bool:
    """Whether the process that booted the rack still runs (and is not this one)."""
    pid = state.owner_pid
    if pid is None or pid == os.getpid():
        return False
    started = nspawn.start_time(pid)
    return started is not None and started == state.owner_start_time


def leftover_hosts(cache_dir: Path, prefix: str) -> set[str]:
    """Hosts of the rack found on the machine without a state file: host dirs and cgroups."""
    names = {p.name for p in (rack_dir(cache_dir, prefix) / "hosts").glob("*") if p.is_dir()}
    with contextlib.suppress(RackUnavailable):
        for tree in cgroup.hierarchies():
            marker = cgroup_name(f"{prefix}-")
            names |= {p.name.removeprefix("rackbox-") for p in tree.glob(f"{marker}*")}
    return names


def bases_in_use(cache_dir: Path) -> set[Path]:
    """The base images (their directories) that racks under `cache_dir` are built on."""
    states = (RackState.load(p) for p in (cache_dir / "racks").glob("*") if p.is_dir())
    return {Path(s.base).parent for s in states if s is not None and s.base}


@dataclass(frozen=True)
class HostStatus:
    """One host as found: its nspawn runs, its overlay is mounted, its SSH port answers."""

    name: str
    ip: str
    running: bool
    mounted: bool


@dataclass(frozen=True)
class RackStatus:
    """One rack as found on the machine."""

    prefix: str
    state_file: bool
    bridge: bool
    inventory: Path | None
    hosts: tuple[HostStatus, ...]

    @property
    def up(self) -> bool:
        """Every host recorded runs."""
        return bool(self.hosts) and all(h.running for h in self.hosts)

    @property
    def leftovers(self) -> bool:
        """Something of the rack is on the machine (up, or half torn down)."""
        return self.state_file or self.bridge or any(h.running or h.mounted for h in self.hosts)


def rack_status(cache_dir: Path, prefix: str) -> RackStatus:
    """The rack named by `prefix` as found on this machine."""
    state = RackState.load(rack_dir(cache_dir, prefix))
    recorded = state.hosts if state else []
    known = {h.name for h in recorded}
    extra = [
        HostState(name, "", str(rack_dir(cache_dir, prefix) / "hosts" / name))
        for name in sorted(leftover_hosts(cache_dir, prefix) - known)
    ]
    inventory = Path(state.inventory) if state and state.inventory else None
    return RackStatus(
        prefix=prefix,
        state_file=state is not None,
        bridge=bridge_exists(state.bridge if state else f"{prefix}br0"),
        inventory=inventory if inventory and inventory.is_file() else None,
        hosts=tuple(
            HostStatus(h.name, h.ip, nspawn.is_running(h), bool(mounts_under(h.root)))
            for h in [*recorded, *extra]
        ),
    )
