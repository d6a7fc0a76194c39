"""`python -m tools.rackbox up|down|status`: the rack-in-a-box from a shell."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from tools.rackbox.errors import RackError, RackUnavailable
from tools.rackbox.rack import Rack, RackStatus, rack_status
from tools.rackbox.spec import DEFAULT_NETWORK, DEFAULT_PREFIX, default_cache_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.rackbox",
        description=__doc__,
        epilog="exit codes: 0 done (status: up), 1 failed, 2 bad usage, 3 status: not up, "
        "4 this machine cannot run a rack (not root, no cgroup v2, ...)",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name-prefix", default=DEFAULT_PREFIX, help="rack name (default: rb)")
    common.add_argument(
        "--cache-dir",
        type=Path,
        help="default: $RACKSERVE_CACHE/rackbox or /var/cache/rackserve/rackbox",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", parents=[common], help="boot a rack")
    up.add_argument("--hosts", type=int, default=3, help="hosts: 1 head + N-1 workers (default 3)")
    up.add_argument("--network", default=DEFAULT_NETWORK, help=f"default {DEFAULT_NETWORK}")
    up.add_argument(
        "--wheelhouse",
        type=Path,
        help="mounted read-only at /srv/wheelhouse "
        "(default: $RACKSERVE_WHEELHOUSE, else an empty directory)",
    )
    up.add_argument(
        "--bind-ro",
        action="append",
        default=[],
        metavar="DIR:PATH",
        help="mount this machine's DIR read-only at PATH in every host (repeatable)",
    )
    up.add_argument(
        "--keep",
        action="store_true",
        help="return once up and leave it running (else wait for "
        "Ctrl-C or SIGTERM, then tear it down)",
    )
    up.add_argument("--boot-timeout", type=float, default=120.0, help="seconds (default 120)")
    commands.add_parser("down", parents=[common], help="stop a rack and remove what it left")
    status = commands.add_parser("status", parents=[common], help="what runs; exit 0 when up")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    return parser


def _print_status(status: RackStatus) -> None:
    state = "up" if status.up else "leftovers" if status.leftovers else "down"
    print(f"rack {status.prefix}: {state}; bridge {'present' if status.bridge else 'absent'}")
    for host in status.hosts:
        running = "running" if host.running else "stopped"
        flags = f"{running}, {'mounted' if host.mounted else 'unmounted'}"
        print(f"  {host.name:<20} {host.ip:<15} {flags}")
    if status.inventory:
        print(f"inventory: {status.inventory}")


def _up(args: argparse.Namespace, rack: Rack) -> int:
    inventory = rack.up()
    print(f"rack {rack.spec.prefix}: {len(rack.hosts)} host(s) up; inventory: {inventory}")
    for host in rack.hosts:
        print(f"  {host.name:<20} {host.ip:<15} ssh -i {rack.private_key} root@{host.ip}")
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in rack.timings.items()))
    if args.keep:
        print(f"left running: python -m tools.rackbox down --name-prefix {rack.spec.prefix}")
        return 0
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    print("Ctrl-C tears it down")
    stop.wait()
    rack.down()
    print(f"rack {rack.spec.prefix}: down in {rack.timings['teardown_s']:.1f} s")
    return 0


def _bind(pair: str) -> tuple[str, str]:
    source, sep, target = pair.rpartition(":")
    if not sep or not source:
        raise ValueError(f"--bind-ro {pair!r}: expected DIR:PATH")
    return source, target


def main(argv: list[str] | None = None) -> int:
    """Run the command; return the exit code (see the parser's epilog)."""
    parser = _parser()
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or default_cache_dir()
    try:
        if args.command == "status":
            status = rack_status(cache_dir, args.name_prefix)
            if args.json:
                print(json.dumps(asdict(status) | {"up": status.up}, default=str, indent=2))
            else:
                _print_status(status)
            return 0 if status.up else 3
        if args.command == "down":
            rack = Rack(prefix=args.name_prefix, cache_dir=cache_dir)
            rack.down()
            print(f"rack {args.name_prefix}: down in {rack.timings['teardown_s']:.1f} s")
            return 0
        rack = Rack(
            args.hosts,
            prefix=args.name_prefix,
            network=args.network,
            cache_dir=cache_dir,
            wheelhouse=args.wheelhouse,
            boot_timeout_s=args.boot_timeout,
            binds=dict(_bind(pair) for pair in args.bind_ro),
        )
        return _up(args, rack)
    except ValueError as exc:  # a bad --name-prefix, --hosts or --network
        parser.error(str(exc))
    except RackUnavailable as exc:
        print(f"rackbox: this machine cannot run a rack: {exc}", file=sys.stderr)
        return 4
    except RackError as exc:
        print(f"rackbox: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
