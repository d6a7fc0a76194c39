"""The bridge the hosts' veths join; the outer machine holds its first address."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from tools.rackbox.errors import RackError
from tools.rackbox.system import run


def bridge_exists(name: str) -> bool:
    """Whether a network interface of that name exists."""
    return Path("/sys/class/net", name).exists()


def check_network_free(bridge: str, network: str) -> None:
    """Raise RackError when another interface already routes (part of) `network`."""
    wanted = ipaddress.IPv4Network(network)
    routes = json.loads(run(["ip", "-json", "-4", "route", "show"]).stdout or "[]")
    for route in routes:
        dst = route.get("dst", "")
        if dst in ("", "default") or route.get("dev") == bridge:
            continue
        if ipaddress.IPv4Network(dst, strict=False).overlaps(wanted):
            raise RackError(
                f"network {network} overlaps {dst} on {route.get('dev')}: "
                "pick another with --network"
            )


def bridge_up(name: str, interface: str, network: str) -> None:
    """Create the bridge with `interface` (address/prefix) and bring it up; reuse it if there."""
    if not bridge_exists(name):
        check_network_free(name, network)
        run(["ip", "link", "add", name, "type", "bridge"])
    addresses = json.loads(run(["ip", "-json", "-4", "addr", "show", "dev", name]).stdout)
    have = {f"{a['local']}/{a['prefixlen']}" for entry in addresses for a in entry["addr_info"]}
    if interface not in have:
        run(["ip", "addr", "add", interface, "dev", name])
    run(["ip", "link", "set", name, "up"])


def bridge_down(name: str) -> None:
    """Delete the bridge if it exists."""
    if bridge_exists(name):
        run(["ip", "link", "del", name])
