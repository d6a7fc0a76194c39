"""The Ansible inventory of a booted rack (YAML; pure apart from `write_inventory`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tools.rackbox.spec import HostSpec
from tools.rackbox.ssh import SSH_COMMON_ARGS


def inventory_data(
    hosts: Sequence[HostSpec], private_key: Path, extra_vars: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Groups `ray_head` (the first host), `ray_workers` (the rest), `gpu_nodes` (all)."""
    host_vars = {
        host.name: {
            "ansible_host": host.ip,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(private_key),
            "ansible_ssh_common_args": " ".join(SSH_COMMON_ARGS),
            "rackserve_node_ip": host.ip,
        }
        for host in hosts
    }
    head, workers = hosts[0], hosts[1:]
    return {
        "all": {
            "vars": {"ansible_python_interpreter": "/usr/bin/python3", **(extra_vars or {})},
            "hosts": host_vars,
            "children": {
                "ray_head": {"hosts": {head.name: {}}},
                "ray_workers": {"hosts": {host.name: {} for host in workers}},
                "gpu_nodes": {"hosts": {host.name: {} for host in hosts}},
            },
        }
    }


def write_inventory(path: Path, data: Mapping[str, Any]) -> Path:
    """Write the inventory as YAML and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Written by tools/rackbox for a rack-in-a-box; rewritten at each `up`.\n"
    path.write_text(header + yaml.safe_dump(dict(data), sort_keys=False))
    return path
