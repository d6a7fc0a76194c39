"""Running a playbook on a rack-in-a-box the way `rackserve bootstrap` does, for the rack tests."""

from __future__ import annotations

import io
from typing import Any

from tools.rackbox import Rack


class Run:
    """One playbook run: the BootstrapResult and what it printed."""

    def __init__(self, result: Any, output: str) -> None:
        self.result = result
        self.output = output

    def changed(self) -> dict[str, int]:
        return {host: counts["changed"] for host, counts in self.result.stats.items()}

    def explain(self) -> str:
        failures = "\n".join(f"{f.host}: {f.task}: {f.message}" for f in self.result.failures)
        return f"failures:\n{failures}\noutput (tail):\n{self.output[-6000:]}"


def bootstrap(rack: Rack, playbook: str = "site", **kwargs: Any) -> Run:
    """Run a playbook on the rack like `rackserve bootstrap`, keeping its progress output."""
    from rich.console import Console  # noqa: PLC0415

    from deployer.bootstrap.runner import run_playbook  # noqa: PLC0415 - the bootstrap extra

    buffer = io.StringIO()
    console = Console(file=buffer, width=200, no_color=True, soft_wrap=True)
    result = run_playbook(rack.inventory, playbook, console=console, **kwargs)
    print(buffer.getvalue())  # shown by pytest when a test fails
    print(f"{playbook}.yml {'--check ' if kwargs.get('check') else ''}{result.elapsed_s:.1f} s")
    return Run(result, buffer.getvalue())
