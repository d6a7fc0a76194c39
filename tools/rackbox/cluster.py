"""Ray on a bootstrapped rack-in-a-box: settings that fit the boxed hosts, and asking Ray.

The hosts share this machine: each sees all its CPUs and memory, and /dev/shm is nspawn's
small tmpfs, so the Ray units get an explicit object store. Ray is asked from inside the head
(over SSH, with the venv's Python), since only the hosts have the rack's Ray installed.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from typing import Any

from tools.rackbox.errors import RackError
from tools.rackbox.rack import Rack

VENV_PYTHON = "/opt/rackserve/venv/bin/python"  # python_env_venv_dir's interpreter
RAY_PORT = 6379
OBJECT_STORE_BYTES = 256 * 2**20

# Inventory variables for Ray on the boxed hosts (beside python_env_wheelhouse, which the
# harness sets): a small object store (/dev/shm), and a rack name for the labels.
RAY_TOKEN = hashlib.sha256(b"rackserve rack-in-a-box").hexdigest()
"""The rack-in-a-box's Ray token (ray_common_auth_token; a real rack keeps a random one in a
vault)."""
RAY_VARS: dict[str, Any] = {
    "rackserve_rack": "box-1",
    "ray_common_auth_token": RAY_TOKEN,
    # The boxed endpoint is reached only from this machine: served without API keys, on purpose.
    "deploy_models_no_auth": True,
    "ray_head_object_store_memory": OBJECT_STORE_BYTES,
    "ray_worker_object_store_memory": OBJECT_STORE_BYTES,
}

# The .debs site.yml installs on a CPU host beyond the base image: python_env's C++ compiler and
# Python headers (vLLM's CPU build compiles at the first request), nftables (the firewalls) and
# the monitoring role's Prometheus and node exporter. They go into the image's apt cache
# (Rack(prefetch=...)), so that the offline hosts install them with apt, from there, as an
# air-gapped rack does from its mirror.
SITE_DEBS = ("g++", "python3-dev", "nftables", "prometheus", "prometheus-node-exporter")

_NODES_SCRIPT = """
import json, sys
from deployer.serving.ray_token import use_rack_token
use_rack_token()  # the rack's Ray token, as rackserve uses it
import ray
ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], logging_level="ERROR",
         log_to_driver=False, configure_logging=False)
nodes = [{"ip": n["NodeManagerAddress"], "alive": n["Alive"], "labels": n.get("Labels", {}),
          "name": n.get("NodeName", ""), "resources": n.get("Resources", {})}
         for n in ray.nodes()]
print("RACKSERVE-NODES " + json.dumps(nodes))
"""


def ray_nodes(rack: Rack, timeout: float = 120) -> list[dict[str, Any]]:
    """Ray's node table (`ray.nodes()`), asked on the head: ip, alive, labels, name, resources."""
    head = rack.hosts[0]
    argv = [VENV_PYTHON, "-c", _NODES_SCRIPT, f"{head.ip}:{RAY_PORT}", head.ip]
    done = rack.ssh(head, shlex.join(argv), check=False, timeout=timeout)
    for line in done.stdout.splitlines():
        if line.startswith("RACKSERVE-NODES "):
            nodes: list[dict[str, Any]] = json.loads(line.split(" ", 1)[1])
            return nodes
    tail = done.stderr[-2000:]
    raise RackError(f"ray.nodes() on {head.name} failed ({done.returncode}):\n{tail}")


def wait_for_alive_nodes(rack: Rack, count: int, timeout_s: float = 120) -> list[dict[str, Any]]:
    """Ray's nodes once `count` of them are alive; raises RackError with the last table."""
    deadline = time.monotonic() + timeout_s
    nodes: list[dict[str, Any]] = []
    error = ""
    while time.monotonic() < deadline:
        try:
            nodes = ray_nodes(rack)
        except RackError as exc:
            error = str(exc)
        else:
            if sum(1 for n in nodes if n["alive"]) >= count:
                return nodes
        time.sleep(3)
    raise RackError(f"{count} alive Ray nodes expected within {timeout_s:.0f} s; "
                    f"last seen: {nodes or error}")  # fmt: skip
