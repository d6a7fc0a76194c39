"""Probe a Ray cluster: one small task on every alive node reads that node's GPUs.

Each task is pinned to its node by id (`NodeAffinitySchedulingStrategy(node_id, soft=False)`)
and asks for no CPU, so it runs on busy nodes and never lands elsewhere. The driver adds what
Ray knows about the node (id, IP, labels) to what the task read with `deployer.serving.nvml_reader`.

Node names: the node's Ray label `rackserve/node` when it has one (`ray start --labels
rackserve/node=gpu-07`), else its IP in the Ray cluster. Host names are not used: several Ray
nodes can share a host, and the launcher pins models by label or node id anyway. Nodes come out
sorted by name, digits compared as numbers (gpu-2 before gpu-10).

Ray is imported inside the functions only: `import deployer` and `rackserve plan` work without it.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from typing import Any, NamedTuple, NoReturn

from deployer.config.cluster import NODE_LABEL, Cluster, Node
from deployer.config.documents import duplicates
from deployer.errors import RackserveError
from deployer.serving.nvml_reader import read_node
from deployer.serving.ray_token import (
    RAY_AUTH_MODE_ENV,
    RAY_TOKEN_FILE,
    RAY_TOKEN_PATH_ENV,
    use_rack_token,
)

RAY_TEMP_DIR_ENV = "RAY_TEMP_DIR"
"""Ray's root temp dir where rackserve starts Ray; with address 'auto' it finds the cluster."""

CONNECT_CHECK_TIMEOUT_S = 5.0


class ProbeError(RackserveError):
    """The cluster could not be reached or a node could not be probed."""


def node_name(labels: dict[str, str], ip: str) -> str:
    """A node's name: its `rackserve/node` label, else its IP."""
    return labels.get(NODE_LABEL) or ip


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key comparing digit runs as numbers: gpu-2 < gpu-10."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of 'host:port' or 'ray://host:port'; None for 'auto' and the like."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _check_reachable(address: str) -> None:
    """Fail fast with a clear message: ray.init waits minutes on an address nobody answers."""
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=CONNECT_CHECK_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ProbeError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}. Check that "
            f"Ray runs there (`ray status --address {address}` on the head node) and that "
            "the address and port (GCS, default 6379; Ray Client: ray://HOST:10001) are right."
        ) from None


def connect(address: str) -> None:
    """Connect this process to the Ray cluster at `address`, or raise ProbeError saying why."""
    use_rack_token()
    import ray

    _check_reachable(address)
    kwargs: dict[str, Any] = {}
    temp_dir = os.environ.get(RAY_TEMP_DIR_ENV)
    if address == "auto" and temp_dir:
        kwargs["_temp_dir"] = temp_dir  # where `ray start` wrote the current cluster's address
    for attempt in range(CLIENT_ATTEMPTS):
        try:
            ray.init(
                address=address,
                logging_level=logging.WARNING,
                log_to_driver=False,
                namespace="rackserve",
                **kwargs,
            )
            break
        except (OSError, RuntimeError, ValueError) as exc:
            ray.shutdown()  # a half-made connection must not linger
            if _client_server_failed(address, exc) and attempt + 1 < CLIENT_ATTEMPTS:
                time.sleep(CLIENT_RETRY_S)
                continue
            _refuse(address, exc)
    _forget_serve_controller()


CLIENT_ATTEMPTS = 3
"""Ray Client's proxy starts a server process for each connection; one that dies as it starts
("Initialization failure from server", seen under load) is worth another try."""
CLIENT_RETRY_S = 2.0


def _client_server_failed(address: str, exc: Exception) -> bool:
    return address.startswith("ray://") and "Initialization failure from server" in str(exc)


def _refuse(address: str, exc: Exception) -> NoReturn:
    if os.environ.get(RAY_AUTH_MODE_ENV) == "token":
        token = (
            f"; this process used Ray's token from {os.environ.get(RAY_TOKEN_PATH_ENV, '~/.ray')}"
            ": check that it is the cluster's"
        )
    else:
        token = (
            f"; if the cluster uses Ray's token authentication (the roles' default), set "
            f"{RAY_AUTH_MODE_ENV}=token and {RAY_TOKEN_PATH_ENV} to its token file "
            f"({RAY_TOKEN_FILE} on the rack's nodes)"
        )
    raise ProbeError(
        f"cannot connect to the Ray cluster at {address}: {str(exc).rstrip('.')}. Run this "
        "on a node of the cluster (one where `ray start` ran), or use Ray Client "
        "(ray://HEAD:10001); "
        f"with 'auto', set RAY_ADDRESS or {RAY_TEMP_DIR_ENV} to the cluster's{token}."
    ) from None


def _forget_serve_controller() -> None:
    """Drop Serve's cached controller handle, which may belong to a cluster that is gone.

    Serve keeps the handle per driver job, and job ids restart at the same value in a new
    cluster: a long-lived process (the controller) that reconnects after a head restart would
    otherwise call the old cluster's Serve controller ("Can't find actor ...").
    """
    context = sys.modules.get("ray.serve.context")  # not imported: nothing cached
    if context is not None:
        context._set_global_client(None)


def _probe_this_node(name: str) -> tuple[str, Node]:
    """The Ray task: this node's id and what NVML (or /proc/meminfo) says."""
    import ray

    return ray.get_runtime_context().get_node_id(), read_node(name)


def task_error(exc: BaseException) -> str:
    """One line of what a Ray task raised: its own exception when Ray kept it."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        return f"{type(exc.cause).__name__}: {exc.cause}"
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


class RayNode(NamedTuple):
    """What Ray's node table says about one alive node, and the name the probe gives it."""

    name: str
    node_id: str
    ip: str
    labels: dict[str, str]


def nodes_to_probe(node_table: list[dict[str, Any]]) -> list[RayNode]:
    """The alive nodes of `ray.nodes()`, named and sorted by name; duplicate names are an error."""
    nodes = []
    for info in node_table:
        if not info.get("Alive"):
            continue
        labels = {str(k): str(v) for k, v in (info.get("Labels") or {}).items()}
        ip = str(info["NodeManagerAddress"])
        nodes.append(RayNode(node_name(labels, ip), str(info["NodeID"]), ip, labels))
    nodes.sort(key=lambda node: _natural_key(node.name))
    repeated = duplicates([node.name for node in nodes])
    if repeated:
        raise ProbeError(
            f"several Ray nodes are named {', '.join(repeated)}: give each node its own "
            f"label with `ray start --labels {NODE_LABEL}=NAME`"
        )
    return nodes


def probe_cluster(address: str = "auto", timeout_s: float = 120.0) -> Cluster:
    """Probe every alive node of the Ray cluster at `address` and describe the cluster.

    `address` is what `ray.init` takes: 'HOST:PORT' (GCS), 'ray://HOST:PORT' or 'auto'. If this
    process is already connected to Ray, that connection is used and left open; otherwise the
    probe connects and disconnects. Raises `ProbeError` with one message on any failure.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    connected_here = not ray.is_initialized()
    if connected_here:
        connect(address)
    try:
        nodes = nodes_to_probe(ray.nodes())  # type: ignore[no-untyped-call]
        if not nodes:
            raise ProbeError(f"the Ray cluster at {address} has no alive node")
        task = ray.remote(_probe_this_node)
        refs = [
            task.options(
                num_cpus=0,
                max_retries=0,
                name=f"rackserve-probe:{name}",
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(name)
            for name, node_id, _, _ in nodes
        ]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        late = [node.name for node, ref in zip(nodes, refs, strict=True) if ref not in ready]
        if late:
            for ref in refs:
                if ref not in ready:
                    ray.cancel(ref, force=True)
            raise ProbeError(
                f"no answer within {timeout_s:.0f} s from node(s) {', '.join(late)}: "
                "check that their raylets are healthy (`ray status`) and can start workers"
            )
        probed: list[Node] = []
        for (name, node_id, ip, labels), ref in zip(nodes, refs, strict=True):
            try:
                ran_on, reading = ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise ProbeError(f"probing node {name} ({ip}) failed: {task_error(exc)}") from None
            if ran_on != node_id:
                raise ProbeError(f"the probe of node {name} ran on Ray node {ran_on} instead")
            probed.append(
                Node.model_validate(
                    reading.model_dump() | {"ray_node_id": node_id, "ip": ip, "labels": labels}
                )
            )
        return Cluster(nodes=probed)
    finally:
        if connected_here:
            ray.shutdown()
