"""A real Ray cluster of several nodes on this machine, on loopback addresses.

For the quickstart, the end-to-end tests and the benchmarks: `ray start --block` processes
that this module starts and stops itself. The head listens on 127.0.0.2 and the worker on
127.0.0.3 (Ray rewrites 127.0.0.1 to the machine's external address), extra workers on
127.0.0.4 and up, each with its own temp dir and the label `rackserve/node=<name>`; workers may
get extra `ray start` arguments (`--num-gpus=4` declares logical GPUs for rehearsals). Each
`ray start` runs in a session of its own, so the stop finds exactly the processes it started,
by PID, and never calls `ray stop` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deployer.errors import RackserveError
from deployer.serving.probe import RAY_TEMP_DIR_ENV

HEAD_IP = "127.0.0.2"
WORKER_IP = "127.0.0.3"
EXTRA_WORKER_IPS = tuple(f"127.0.0.{host}" for host in range(4, 255))
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
# Ray's sockets live at <temp dir>/session_<date>_<pid>/sockets/plasma_store: about 60
# characters below the temp dir, within the 107 of a Unix socket path.
MAX_TEMP_DIR_CHARS = 40


@dataclass(frozen=True)
class RayNode:
    """One `ray start --block` process of the local cluster."""

    name: str
    ip: str
    temp_dir: Path
    log: Path
    process: subprocess.Popen[bytes]


@dataclass(frozen=True)
class WorkerSpec:
    """A worker to start: its `rackserve/node` name and extra `ray start` arguments."""

    name: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class RayCluster:
    """The running local cluster: its GCS and Ray Client addresses and its nodes, head first."""

    address: str
    client_address: str
    nodes: tuple[RayNode, ...]
    head_args: tuple[str, ...] = ()
    """The head's `ray start` arguments, for `restart_head`."""
    head_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    started: list[RayNode] = field(default_factory=list, repr=False, compare=False)
    """Every node started, restarts included: what the teardown stops."""

    @property
    def node_names(self) -> list[str]:
        """The nodes' `rackserve/node` labels, head first."""
        return [node.name for node in self.nodes]


class LocalRayError(RackserveError):
    """A local Ray node could not be started."""


# Ports handed out are taken from between Ray's worker ports (10002-19999 unless set) and the
# kernel's ephemeral range. A port the kernel picks (bind to port 0) comes from the ephemeral
# range, where any outgoing connection may take it as its local port before the test binds it
# (Ray opens many): a Serve proxy once failed to bind its HTTP port that way in CI.
QUIET_PORTS_LOW = 20000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def free_port(ip: str) -> int:
    """A TCP port free on `ip` now that no outgoing connection or Ray worker will take.

    Not one this process handed out before: the caller may bind it only later.
    """
    candidates = [p for p in range(QUIET_PORTS_LOW, _ephemeral_low()) if p not in _handed_out]
    for port in random.sample(candidates, min(len(candidates), 200)):
        with socket.socket() as sock:
            try:
                sock.bind((ip, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise LocalRayError(
        f"no free TCP port on {ip} between {QUIET_PORTS_LOW} and the ephemeral range"
    )


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.exists() else shutil.which("ray")
    if found is None:
        raise LocalRayError("the `ray` command is not installed (pip install -e '.[serve]')")
    return found


def _session_pids(session_id: int) -> list[int]:
    """PIDs of the processes in a session: a `ray start` and everything it spawned."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # Field 6 is the session id; the command name (field 2) may hold spaces.
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[3]) == session_id:
                pids.append(int(stat.parent.name))
    return pids


def _stop(node: RayNode) -> None:
    """SIGTERM the `ray start` (it stops its children), then SIGKILL what is left of its session."""
    if node.process.poll() is None:
        node.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(STOP_TIMEOUT_S)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (pids := _session_pids(node.process.pid)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.process.wait(STOP_TIMEOUT_S)


def kill_node(node: RayNode) -> None:
    """A power cut: SIGKILL every process of the node's session at once (no drain, no goodbye)."""
    for pid in _session_pids(node.process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.process.wait(STOP_TIMEOUT_S)


def restart_head(cluster: RayCluster, down_s: float = 0.0) -> RayCluster:
    """The head killed (SIGKILL, every process at once), `down_s` seconds gone, started again.

    The same address, ports, node name and environment (GCS persistence included), a fresh
    temp dir; the workers are left alone. The teardown of `start_ray_cluster` stops it too.
    """
    head = cluster.nodes[0]
    kill_node(head)
    time.sleep(down_s)
    again = head.temp_dir.with_name(f"{head.temp_dir.name}-{len(cluster.started)}")
    new = _start(list(cluster.head_args), head.name, head.ip, again, dict(cluster.head_env))
    cluster.started.append(new)
    _wait_started(new, time.monotonic() + START_TIMEOUT_S)
    return dataclasses.replace(cluster, nodes=(new, *cluster.nodes[1:]))


def _start(args: list[str], name: str, ip: str, temp_dir: Path, env: dict[str, str]) -> RayNode:
    temp_dir.mkdir(parents=True)
    log = temp_dir.with_suffix(".log")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                _ray_executable(),
                "start",
                "--block",
                f"--node-ip-address={ip}",
                f"--temp-dir={temp_dir}",
                f"--labels=rackserve/node={name}",
                "--num-cpus=2",
                f"--memory={4 * 1024**3}",
                f"--object-store-memory={128 * 1024**2}",
                f"--dashboard-agent-listen-port={free_port(ip)}",
                "--disable-usage-stats",
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own session: teardown finds all it spawned
        )
    return RayNode(name=name, ip=ip, temp_dir=temp_dir, log=log, process=process)


def _wait_started(node: RayNode, deadline: float) -> None:
    while time.monotonic() < deadline:
        if "Ray runtime started" in node.log.read_text(errors="replace"):
            return
        if node.process.poll() is not None:
            break
        time.sleep(0.2)
    tail = node.log.read_text(errors="replace")[-3000:]
    raise LocalRayError(f"`ray start` for node {node.name} ({node.ip}) did not start:\n{tail}")


def _wait_nodes_alive(address: str, count: int, env: dict[str, str], timeout_s: float) -> None:
    """Wait, in a separate driver, until the GCS lists `count` alive nodes."""
    script = (
        "import sys, time, ray\n"
        "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
        "deadline = time.monotonic() + float(sys.argv[3])\n"
        "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]):\n"
        "    if time.monotonic() > deadline: sys.exit('only %s' % ray.nodes())\n"
        "    time.sleep(0.2)\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, address, str(count), str(timeout_s)],
        env=env,
        check=True,
        timeout=timeout_s + 30,
        stdin=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def start_ray_cluster(
    base_dir: Path,
    names: tuple[str, str] = ("head", "worker"),
    *,
    worker_args: Sequence[str] = (),
    extra_workers: Sequence[WorkerSpec] = (),
    head_env: Mapping[str, str] | None = None,
    head_only: bool = False,
) -> Iterator[RayCluster]:
    """Start a head and a worker on loopback addresses; stop them all (by PID) on exit.

    `worker_args` go to the worker's `ray start` (after the defaults, so they win: click keeps
    an option's last value); `extra_workers` start on 127.0.0.4, 127.0.0.5, ... in turn;
    `head_env` is more environment for the head (GCS persistence: `RAY_gcs_storage`, ...);
    `head_only`: no worker at all (one host's worth of Ray, for the serving benchmark).
    """
    if len(extra_workers) > len(EXTRA_WORKER_IPS):
        raise LocalRayError(f"at most {len(EXTRA_WORKER_IPS)} extra workers fit on loopback")
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS"}}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # Ray 2.60 drains 30 s on SIGTERM
    # `ray start --head` turns token auth on when ~/.ray/auth_token exists (a plain `ray.init()`
    # writes one), while drivers given an address never do: they would then be refused.
    env["RAY_AUTH_MODE"] = "disabled"
    port, client_port = free_port(HEAD_IP), free_port(HEAD_IP)
    address = f"{HEAD_IP}:{port}"
    nodes: list[RayNode] = []
    head_args = (
        "--head",
        f"--port={port}",
        f"--ray-client-server-port={client_port}",
        "--include-dashboard=false",
    )
    env_of_head = {**env, **(head_env or {})}
    try:
        head = _start(list(head_args), names[0], HEAD_IP, base_dir / names[0], env_of_head)
        nodes.append(head)
        _wait_started(head, time.monotonic() + START_TIMEOUT_S)
        workers = [] if head_only else [WorkerSpec(names[1], tuple(worker_args)), *extra_workers]
        for spec, ip in zip(workers, (WORKER_IP, *EXTRA_WORKER_IPS), strict=False):
            worker = _start(
                [f"--address={address}", *spec.args], spec.name, ip, base_dir / spec.name, env
            )
            nodes.append(worker)
            _wait_started(worker, time.monotonic() + START_TIMEOUT_S)
        _wait_nodes_alive(address, len(nodes), env, START_TIMEOUT_S)
        yield RayCluster(
            address=address,
            client_address=f"ray://{HEAD_IP}:{client_port}",
            nodes=tuple(nodes),
            head_args=head_args,
            head_env=env_of_head,
            started=nodes,
        )
    finally:
        for node in reversed(nodes):
            _stop(node)


@contextlib.contextmanager
def temp_root(prefix: str = "rs-") -> Iterator[Path]:
    """A fresh directory for local Ray nodes' temp dirs, removed afterwards.

    Under $RAY_TEMP_DIR when set (rackserve honours it wherever it starts Ray), else under
    /tmp; kept short, since Ray's Unix socket paths must fit in 107 characters.
    """
    root = os.environ.get(RAY_TEMP_DIR_ENV)
    if root:
        Path(root).mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=root or "/tmp"))
    if len(str(base)) > MAX_TEMP_DIR_CHARS - len("/worker"):
        shutil.rmtree(base, ignore_errors=True)
        base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)
