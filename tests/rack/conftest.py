"""The rack-in-a-box for the rack tests: 3 hosts (1 head, 2 workers) for the whole session.

Needs root and a machine where systemd-nspawn boots; skips with the reason otherwise, unless
RACKSERVE_RACK_REQUIRED=1 (CI), where that is a failure. The rack's name prefix and network
come from RACKSERVE_RACK_PREFIX / RACKSERVE_RACK_NETWORK (default rbt, 10.231.1.0/24), apart
from `python -m tools.rackbox up`'s default rack (rb, 10.231.0.0/24); the wheelhouse from
RACKSERVE_WHEELHOUSE (else an empty directory).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tools.rackbox import Rack, RackUnavailable, rack_status

RACK_HOSTS = 3


def rack_prefix() -> str:
    """The test rack's name prefix: hosts <prefix>-head, <prefix>-worker-N."""
    return os.environ.get("RACKSERVE_RACK_PREFIX", "rbt")


def rack_network() -> str:
    """The test rack's /24."""
    return os.environ.get("RACKSERVE_RACK_NETWORK", "10.231.1.0/24")


def skip_or_fail(reason: str) -> None:
    """Skip the test, or fail it where the rack is required (RACKSERVE_RACK_REQUIRED=1)."""
    if os.environ.get("RACKSERVE_RACK_REQUIRED") == "1":
        pytest.fail(f"rack-in-a-box required but unavailable: {reason}", pytrace=False)
    pytest.skip(f"rack-in-a-box unavailable: {reason}")


@pytest.fixture(scope="session")
def rack() -> Iterator[Rack]:
    """A booted 3-host rack: `.inventory` (path), `.hosts` (`.name`, `.ip`), `.ssh(host, cmd)`.

    Torn down at the end of the session; a rack of the same prefix left by a killed session is
    replaced. Teardown fails the session if anything of the rack is left on the machine.
    """
    yield from booted(Rack(RACK_HOSTS, prefix=rack_prefix(), network=rack_network(), replace=True))


def booted(rack: Rack) -> Iterator[Rack]:
    """Boot `rack` for a fixture and yield it: skip (or fail, where required) if it cannot
    boot; afterwards tear it down and fail if anything of it is left on the machine."""
    try:
        rack.up()
    except RackUnavailable as exc:
        skip_or_fail(str(exc))
    try:
        yield rack
    finally:
        rack.down()
    left = rack_status(rack.spec.cache_dir, rack.spec.prefix)
    assert not left.leftovers, f"rack {left.prefix} left behind: {left}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use a rack are integration tests."""
    for item in items:
        if "rack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
