"""One host: an overlay on the base image, its own files, and a systemd-nspawn in its own cgroup."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tools.rackbox import cgroup
from tools.rackbox.spec import WHEELHOUSE_MOUNT, HostSpec
from tools.rackbox.state import HostState
from tools.rackbox.system import mounts_under, run, unmount_all

PROPAGATE_DIR = Path("/run/systemd/nspawn/propagate")
NSPAWN_ENV = {
    "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",  # pure cgroup v2 inside, no hybrid-mode warnings
    "SYSTEMD_NSPAWN_TMPFS_TMP": "0",  # /tmp on disk as on a Debian host, not a 10%-of-RAM tmpfs
}


def host_files(
    host: HostSpec, all_hosts: Sequence[HostSpec], authorized_key: str
) -> dict[str, str]:
    """The files that make a copy of the base image this host (path inside the host: content)."""
    hosts_lines = "".join(f"{h.ip}\t{h.name}\n" for h in all_hosts)
    return {
        "etc/hostname": f"{host.name}\n",
        "etc/hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n{hosts_lines}",
        # Same name as systemd's DHCP default for containers, so it replaces it.
        "etc/systemd/network/80-container-host0.network": (
            "[Match]\nName=host0\n\n[Network]\n"
            f"Address={host.ip}/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n"
        ),
        "root/.ssh/authorized_keys": authorized_key,
    }


def prepare(state: HostState, base: Path, files: dict[str, str]) -> None:
    """Mount the host's overlay (base image read-only below) and write its files into it."""
    directory = Path(state.directory)
    for sub in ("upper", "work", "root"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    if not mounts_under(state.root):
        options = f"lowerdir={base},upperdir={directory / 'upper'},workdir={directory / 'work'}"
        run(["mount", "-t", "overlay", "overlay", "-o", options, state.root])
    for relative, content in files.items():
        path = state.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    (state.root / "root/.ssh").chmod(0o700)
    (state.root / "root/.ssh/authorized_keys").chmod(0o600)


def nspawn_argv(
    state: HostState, bridge: str, wheelhouse: Path, binds: Sequence[tuple[Path, str]] = ()
) -> list[str]:
    """The systemd-nspawn command line that boots the host; `binds`: (outside, inside) pairs
    mounted read-only besides the wheelhouse."""
    return [
        "systemd-nspawn",
        "--boot",
        f"--directory={state.root}",
        f"--machine={state.name}",
        "--register=no",  # no D-Bus on the outer machine
        "--keep-unit",  # stay in the cgroup the wrapper moved us to
        f"--network-bridge={bridge}",
        f"--bind-ro={wheelhouse}:{WHEELHOUSE_MOUNT}",
        *(f"--bind-ro={source}:{target}" for source, target in binds),
        "--console=read-only",
        "--link-journal=no",
        "--resolv-conf=off",
    ]


def start(
    state: HostState, bridge: str, wheelhouse: Path, binds: Sequence[tuple[Path, str]] = ()
) -> subprocess.Popen[bytes]:
    """Start the host's nspawn in its own session and cgroups; record its PID in `state`."""
    paths = cgroup.create(state.name)
    state.cgroups = [str(p) for p in paths]
    # A shell moves itself into the host's cgroups, then becomes systemd-nspawn.
    script = "set -e; " + "".join(
        f"echo $$ > {shlex.quote(str(p / 'cgroup.procs'))}; " for p in paths
    )
    state.console_log.parent.mkdir(parents=True, exist_ok=True)
    with state.console_log.open("wb") as log:
        process = subprocess.Popen(
            [
                "sh",
                "-c",
                script + 'exec "$@"',
                "rackbox-nspawn",
                *nspawn_argv(state, bridge, wheelhouse, binds),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **NSPAWN_ENV},
        )
    state.pid = process.pid
    state.start_time = start_time(process.pid)
    return process


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def is_running(state: HostState) -> bool:
    """Whether the host's nspawn (the very process started, not a reused PID) still runs."""
    if state.pid is None:
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(state.pid, os.WNOHANG)  # reap it if it is our child and has ended
    return state.start_time is not None and start_time(state.pid) == state.start_time


def adopt(state: HostState) -> None:
    """Find the host's nspawn in its cgroups (state file lost) and record it in `state`."""
    for path in state.cgroups:
        for pid in cgroup.pids(Path(path)):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd-nspawn":
                    state.pid, state.start_time = pid, start_time(pid)
                    return


def signal_host(state: HostState, signum: int) -> None:
    """Send `signum` to the host's nspawn if it still runs."""
    if is_running(state) and state.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, signum)


def container_init(state: HostState) -> int | None:
    """The PID (outside) of the host's systemd: the nspawn's child."""
    if not is_running(state):
        return None
    try:
        children = Path(f"/proc/{state.pid}/task/{state.pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def wait_stopped(states: Sequence[HostState], timeout_s: float) -> list[HostState]:
    """Wait until the hosts' nspawns end; return those still running at the timeout."""
    deadline = time.monotonic() + timeout_s
    running = [s for s in states if is_running(s)]
    while running and time.monotonic() < deadline:
        time.sleep(0.1)
        running = [s for s in running if is_running(s)]
    return running


def stop_all(states: Sequence[HostState], timeout_s: float) -> None:
    """Power the hosts off (SIGTERM to nspawn); SIGKILL each one's systemd after `timeout_s`.

    Anything left after that in a host's cgroups (its processes only) is killed too.
    """
    for state in states:
        signal_host(state, signal.SIGTERM)
    stuck = wait_stopped(states, timeout_s)
    for state in stuck:
        init = container_init(state)
        if init is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)
    stuck = wait_stopped(stuck, 5.0)
    for state in stuck:
        signal_host(state, signal.SIGKILL)
    for state in states:
        for path in state.cgroups:
            cgroup.kill(Path(path))
    wait_stopped(states, 5.0)


def power_cut(state: HostState, timeout_s: float = 10.0) -> bool:
    """Kill every process of the host at once (SIGKILL through its cgroups), as a power cut does.

    Its disk (the overlay) stays as it was, for `start` to boot again. The dead systemd's
    cgroups and nspawn's propagate directory go, as they would with the machine's power.
    Return whether the host stopped within `timeout_s`.
    """
    for path in state.cgroups:
        cgroup.kill(Path(path))
    if wait_stopped([state], timeout_s):
        return False
    for path in state.cgroups:
        cgroup.remove(Path(path))
    _forget_propagate(state)
    return True


def _forget_propagate(state: HostState) -> None:
    propagate = PROPAGATE_DIR / state.name
    unmount_all(propagate)
    shutil.rmtree(propagate, ignore_errors=True)


def clean(state: HostState) -> None:
    """Remove what the host left on the outer machine: mounts, cgroups, nspawn's propagate dir."""
    unmount_all(state.root)
    for path in state.cgroups or [str(p) for p in cgroup.host_cgroups(state.name)]:
        cgroup.remove(Path(path))
    _forget_propagate(state)
    if not mounts_under(Path(state.directory)):
        shutil.rmtree(state.directory, ignore_errors=True)
