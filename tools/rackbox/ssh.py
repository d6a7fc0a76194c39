"""Root SSH into the hosts: the harness's key pair, the client options, waiting for sshd."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tools.rackbox.errors import RackBootError
from tools.rackbox.system import run

# The hosts make new host keys at each boot: never record or check them.
SSH_COMMON_ARGS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null")
SSH_OPTIONS = (
    *SSH_COMMON_ARGS,
    "-o", "BatchMode=yes",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=5",
)  # fmt: skip


def ensure_keypair(directory: Path) -> Path:
    """The harness's ed25519 key pair in `directory`, made once; returns the private key."""
    key = directory / "id_ed25519"
    if not key.is_file() or not key.with_suffix(".pub").is_file():
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rackbox", "-f", key])
    return key


def ssh_argv(key: Path, ip: str, command: str) -> list[str]:
    """The `ssh` command line that runs `command` (a shell string) as root on `ip`."""
    return ["ssh", "-i", str(key), *SSH_OPTIONS, f"root@{ip}", "--", command]


def ssh(
    key: Path, ip: str, command: str, *, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `command` on the host at `ip`; `check` raises CalledProcessError on failure."""
    return subprocess.run(
        ssh_argv(key, ip, command),
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _port_open(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_ssh(key: Path, ip: str, deadline: float, still_booting: Callable[[], bool]) -> None:
    """Return once `ssh root@ip true` works; raise RackBootError at `deadline`.

    `still_booting` is asked between tries; when it says False (the host's nspawn is gone) the
    wait ends at once.
    """
    while time.monotonic() < deadline:
        if _port_open(ip, 22):
            done = subprocess.run(
                ssh_argv(key, ip, "true"), capture_output=True, text=True, timeout=30, check=False
            )
            if done.returncode == 0:
                return
        if not still_booting():
            raise RackBootError(f"{ip}: the host stopped before SSH answered")
        time.sleep(0.2)
    raise RackBootError(f"{ip}: no SSH login before the boot timeout")
