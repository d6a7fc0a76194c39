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

Day 2 (`--part day-two`, also in the default `all`), on 4 fresh hosts of which the inventory
lists 3, serving two stand-in engines (not pinned) while a client loop asks every model through
the endpoint and counts each answer:

    fresh deploy of a third model      rackserve deploy (on the head) until it answers
    drain of that model's node         rackserve drain: make-before-break to another worker
    upgrade.yml over the two workers   a bumped rackserve wheel, drained/upgraded/undrained each
    scale.yml, one new worker          the fourth host added to the inventory

with the failed requests per model during each, and the drain / fresh deploy ratio (target
1.3 or less: a move costs about what starting the engine costs, not a redeploy of the rack).
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
from tools.client_loop import wait_answering
from tools.rackbox import Rack, check_machine
from tools.rackbox.cluster import RAY_VARS, SITE_DEBS, wait_for_alive_nodes
from tools.rackbox.day_two import (
    CLUSTER_PATH,
    MODELS,
    SERVE_PORT,
    UPGRADE_MOUNT,
    UPGRADE_VARS,
    Measured,
    deploy,
    head_command,
    measured,
    placed,
    standin_vars,
    upgrade_wheels,
)
from tools.rackbox.playbooks import bootstrap
from tools.rackbox.wheelhouse import ensure_wheelhouse

PREFIX = "rbb"
NETWORK = "10.231.30.0/24"
DAY_TWO_PREFIX = "rbd"
DAY_TWO_NETWORK = "10.231.31.0/24"
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


def played(rack: Rack, playbook: str, **extravars: Any) -> Any:
    """A day-2 playbook, confirmed; raises on a failed run."""
    run = bootstrap(rack, playbook, extravars={"skip_confirmation": True, **extravars})
    if not run.result.ok:
        raise SystemExit(f"{playbook}.yml failed: {run.explain()}")
    return run


def day_two(wheelhouse: Path) -> dict[str, Measured]:
    """The day-2 steps on a fresh 4-host rack, each measured while every model is asked."""
    steps: dict[str, Measured] = {}
    with upgrade_wheels(sys.executable) as wheels:
        rack = Rack(4, prefix=DAY_TWO_PREFIX, network=DAY_TWO_NETWORK, wheelhouse=wheelhouse,
                    prefetch=SITE_DEBS, binds={wheels: UPGRADE_MOUNT}, replace=True)  # fmt: skip
        with rack:
            listed = rack.hosts[:3]
            rack.write_inventory(extra_vars=standin_vars(listed[1:]), hosts=listed)
            converge(rack, "first converge, 3 hosts, 2 models")
            head = rack.hosts[0].ip
            wait_answering(SERVE_PORT, list(MODELS), 300, host=head)
            three = [*MODELS, "c"]

            def fresh() -> None:
                # Half the others' size: room for the three on one worker once the other drains
                deploy(rack, three, gib={"c": 0.5})
                wait_answering(SERVE_PORT, ["c"], 300, host=head)

            steps["deploy"] = measured(rack, "fresh deploy of a third model", fresh, MODELS)
            node = placed(rack)["c"]
            steps["drain"] = measured(
                rack, f"drain {node} (model c)",
                lambda: head_command(rack, "drain", node, "--cluster", CLUSTER_PATH), three,
            )  # fmt: skip
            head_command(rack, "undrain", node, "--cluster", CLUSTER_PATH)
            deploy(rack, MODELS)
            steps["upgrade"] = measured(
                rack, "upgrade.yml over two workers",
                lambda: played(rack, "upgrade", upgrade_head=False, **UPGRADE_VARS),
            )  # fmt: skip
            rack.write_inventory(extra_vars={**standin_vars(rack.hosts[1:]), **UPGRADE_VARS})
            steps["scale"] = measured(
                rack, "scale.yml, one new worker", lambda: played(rack, "scale")
            )
    return steps


def show_day_two(steps: dict[str, Measured]) -> dict[str, Any]:
    """Print the day-2 table; return its figures."""
    print("\nday 2 (stand-in engines; a client loop asks every model throughout each step)")
    for step in steps.values():
        failed = sum(step.failed().values())
        answered = sum(step.answered().values())
        print(f"  {step.what:<36} {step.wall_s:7.1f} s   failed {failed} of {failed + answered}"
              f" requests {step.failed()}")  # fmt: skip
    ratio = steps["drain"].wall_s / steps["deploy"].wall_s
    print(f"  drain / fresh deploy ratio           {ratio:7.2f}   (target 1.3 or less)")
    figures: dict[str, Any] = {
        name: {"wall_s": s.wall_s, "failed": s.failed(), "answered": s.answered()}
        for name, s in steps.items()
    }
    return {**figures, "drain_ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=1, help="repetitions (default 1)")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument(
        "--part", choices=["all", "converge", "day-two"], default="all", help="default all"
    )
    args = parser.parse_args(argv)
    check_machine()

    wheelhouse = ensure_wheelhouse()
    print(wheelhouse.describe(), flush=True)
    report: dict[str, Any] = {"wheelhouse": wheelhouse.describe()}
    if args.part in ("all", "converge"):
        report.update(converges(wheelhouse.path, args.repeat))
    if args.part in ("all", "day-two"):
        report["day_two"] = show_day_two(day_two(wheelhouse.path))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def converges(wheelhouse: Path, repeat: int) -> dict[str, Any]:
    """The converge figures, `repeat` times."""
    three: list[float] = []
    noop: list[float] = []
    one: list[float] = []
    for repetition in range(1, repeat + 1):
        print(f"repetition {repetition}/{repeat}", flush=True)
        big = one_round(wheelhouse, 3, second_run=True)
        three.append(big["first"]["wall_s"])
        noop.append(big["second"]["wall_s"])
        if any(big["second"]["changed"].values()):
            print(f"  warning: the second run changed {big['second']['changed']}")
        one.append(one_round(wheelhouse, 1, second_run=False)["first"]["wall_s"])

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
    return {"first_3_s": three, "second_3_s": noop, "first_1_s": one, "ratio": ratio}


if __name__ == "__main__":
    sys.exit(main())
