"""What the fault tests share besides `tools.client_loop`: a driver, and `rackserve status`.

The driver is the one spawned process that deploys (Ray Serve LLM cannot load in the pytest
process, see `tests.integration.rehearsal`).
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration import rehearsal
from tools.local_ray import HEAD_IP, free_port, temp_root


@dataclass(frozen=True)
class Driver:
    """The process that deploys (Ray Serve LLM cannot load in the pytest process), a port, a dir."""

    executor: ProcessPoolExecutor
    port: int
    base: Path

    def submit(self, function: Any, *args: Any, timeout: float = 600) -> Any:
        return self.executor.submit(function, *args).result(timeout=timeout)


def start_driver(prefix: str) -> Iterator[Driver]:
    """A driver process, a free port on the head's address and a fresh directory."""
    with (
        temp_root(prefix) as base,
        ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=rehearsal.init_process,
        ) as executor,
    ):
        port = free_port(HEAD_IP)
        yield Driver(executor, port, base)


def status(address: str, state_dir: str) -> subprocess.CompletedProcess[str]:
    """`rackserve status --state-dir DIR --json -`, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "deployer", "status", "--address", address, "--state-dir",
         state_dir, "--json", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
