"""The rack-in-a-box: Debian hosts booted with systemd-nspawn, reached over SSH like a rack.

    with Rack(hosts=3) as rack:
        rack.ssh("rb-head", "systemctl is-system-running")
        subprocess.run(["ansible", "-i", rack.inventory, "all", "-m", "ansible.builtin.ping"])

or `python -m tools.rackbox up|down|status`. Needs root. See docs/rack-in-a-box.md.
"""

from __future__ import annotations

from tools.rackbox.errors import RackBootError, RackError, RackUnavailable
from tools.rackbox.rack import HostStatus, Rack, RackStatus, check_machine, rack_status
from tools.rackbox.spec import WHEELHOUSE_MOUNT, HostSpec, RackSpec, default_cache_dir

__all__ = [
    "WHEELHOUSE_MOUNT",
    "HostSpec",
    "HostStatus",
    "Rack",
    "RackBootError",
    "RackError",
    "RackSpec",
    "RackStatus",
    "RackUnavailable",
    "check_machine",
    "default_cache_dir",
    "rack_status",
]
