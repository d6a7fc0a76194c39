"""The processes a fault test or the recovery benchmark kills: Serve replicas, vLLM engines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_REPLICA_PIDS = (
    "import json, sys, ray\n"
    "from ray.serve.context import _get_global_client\n"
    "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
    "details = _get_global_client().get_serve_details()\n"
    "print(json.dumps({name: [r['pid'] for d in app['deployments'].values()"
    " for r in d['replicas'] if r['state'] == 'RUNNING'] for name, app in"
    " details['applications'].items()}))\n"
)


def replica_pids(address: str) -> dict[str, int]:
    """Each application's running replica PID, from Serve's own details (in a child process)."""
    out = subprocess.run(
        [sys.executable, "-c", _REPLICA_PIDS, address], capture_output=True, text=True, check=True
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    return {name: pids[0] for name, pids in found.items() if pids}


def children(parent_pid: int) -> dict[int, str]:
    """The running children of a process (started from any of its threads): PID -> argv."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            command = stat.with_name("cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == parent_pid:
            found[int(stat.parent.name)] = command.strip()
    return found


def engine_process(replica_pid: int) -> tuple[int, str]:
    """The replica's vLLM engine core process: PID, argv."""
    for pid, command in children(replica_pid).items():
        if "EngineCore" in command:
            return pid, command
    raise LookupError(f"no vLLM engine core process under the replica (PID {replica_pid})")
