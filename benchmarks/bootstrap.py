"""Bootstrap wall times on the rack-in-a-box (root): how long `rackserve bootstrap` takes.

    python benchmarks/bootstrap.py [--repeat N] [--json OUT]      (nox -s bench_bootstrap)

Per repetition, on fresh hosts booted from the cached image, through `run_playbook` (the API of
`rackserve bootstrap`), site.yml with `deploy_models_enabled: false` and the offline wheelhouse:

    first converge, 3 hosts (1 head, 2 workers)   everything installed and started
    second run, 3 hosts                           the no-op run (changed=0 expected)
    first converge, 1 host (a head alone)         the same work on one host

The 3-host/1-host ratio of the first converges shows how well the run spreads over the hosts
(1.0: as fast as one host; 3.0: no better than one host after the other). On this machine the
three hosts share its cores and disk, so the ratio measures contention as much as Ansible; on
a real rack each host brings its own. The wheelhouse is built first if needed (not timed here;
its time is printed).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console

from deployer.bootstrap.runner import run_playbook
from tools.rackbox import Rack, check_machine
from tools.rackbox.cluster import RAY_VARS, SITE_DEBS, wait_for_alive_nodes
from tools.rackbox.wheelhouse import ensure_wheelhouse

PREFIX = "rbb"
NETWORK = "10.231.30.0/24"
VARS: dict[str, Any] = {**RAY_VARS, "deploy_models_enabled": False}


def converge(rack: Rack, label: str) -> dict[str, Any]:
    """site.yml once; its wall time and changed counts. Raises on a failed run."""
    buffer = io.StringIO()
    started = time.monotonic()
    result = run_playbook(rack.inventory, "site", console=Console(file=buffer, width=200))
    wall = time.monotonic() - started
    if not result.ok:
        print(buffer.getvalue()[-8000:])
        raise SystemExit(f"{label}: site.yml failed: {list(result.failures)}")
    changed = {host: counts["changed"] for host, counts in sorted(result.stats.items())}
    print(f"  {label:<28} {wall:7.1f} s   changed {changed}", flush=True)
    return {"wall_s": wall, "changed": changed}


def one_round(wheelhouse: Path, hosts: int, second_run: bool) -> dict[str, Any]:
    """Boot `hosts` fresh hosts, converge (and run again), tear down."""
    rack = Rack(hosts, prefix=PREFIX, network=NETWORK, wheelhouse=wheelhouse,
                inventory_vars=VARS, prefetch=SITE_DEBS, replace=True)  # fmt: skip
    with rack:
        print(f"  {hosts} host(s) up in {rack.timings['up_s']:.1f} s", flush=True)
        first = converge(rack, f"first converge, {hosts} host(s)")
        wait_for_alive_nodes(rack, hosts)
        again = converge(rack, f"second run, {hosts} host(s)") if second_run else None
    return {"first": first, "second": again}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=1, help="repetitions (default 1)")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args(argv)
    check_machine()

    wheelhouse = ensure_wheelhouse()
    print(wheelhouse.describe(), flush=True)
    three: list[float] = []
    noop: list[float] = []
    one: list[float] = []
    for repetition in range(1, args.repeat + 1):
        print(f"repetition {repetition}/{args.repeat}", flush=True)
        big = one_round(wheelhouse.path, 3, second_run=True)
        three.append(big["first"]["wall_s"])
        noop.append(big["second"]["wall_s"])
        if any(big["second"]["changed"].values()):
            print(f"  warning: the second run changed {big['second']['changed']}")
        one.append(one_round(wheelhouse.path, 1, second_run=False)["first"]["wall_s"])

    def show(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:7.1f} s"
        return f"{statistics.median(values):7.1f} s (median; {min(values):.1f}-{max(values):.1f})"

    ratio = statistics.median(three) / statistics.median(one)
    print("\nrackserve bootstrap (site.yml, deploy_models off, offline wheelhouse)")
    print(f"  first converge, 3 hosts   {show(three)}")
    print(f"  second run (no-op), 3     {show(noop)}")
    print(f"  first converge, 1 host    {show(one)}")
    print(f"  3-host / 1-host ratio     {ratio:7.2f}")
    if args.json:
        report = {"first_3_s": three, "second_3_s": noop, "first_1_s": one, "ratio": ratio,
                  "wheelhouse": wheelhouse.describe()}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
