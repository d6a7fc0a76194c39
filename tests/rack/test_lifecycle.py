"""Day-2 playbooks on a 4-host rack-in-a-box while every model answers (marker `lifecycle`).

The rack boots four hosts; the inventory lists the head and two workers, and site.yml deploys
two models (the stand-in engine on CPU nodes, not pinned; a cluster file lists the workers).
A client loop asks every model through the head's endpoint throughout each step and counts
each request's answer, per model. In order, on one rack:
- `rackserve drain` of the worker serving `a` moves it to another worker, no request fails;
  undrain moves nothing back;
- upgrade.yml rolls rackserve's own version (a wheel with a bumped version, bind-mounted in
  the hosts) over the two workers, each drained, upgraded, rejoined and undrained in turn, with
  no failed request (the head's turn, `upgrade_workers=false`, is left out here for CI's time:
  requests fail while its Ray restarts, as the README's measured table shows);
- scale.yml adds the third worker (the inventory now asks for the new version): Ray lists four
  nodes, the engines' replicas keep their start times, and no request fails;
- remove-node.yml resets a worker, which leaves Ray; then, on a worker whose power was cut,
  with allow_unreachable, its model is re-placed.

The stand-in serves no tokens: an answer is its refusal (HTTP 501 naming the stand-in), which
proves the request went through the proxy, the ingress and a live engine replica and back.
About 20 minutes on 2 cores (`nox -s lifecycle`, which `.ci/run` runs after `nox -s tests`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rack.conftest import booted, skip_or_fail
from tools.client_loop import wait_answering
from tools.rackbox import Rack, RackUnavailable, check_machine
from tools.rackbox.cluster import SITE_DEBS, wait_for_alive_nodes
from tools.rackbox.day_two import (
    CLUSTER_PATH,
    MODELS,
    SERVE_PORT,
    UPGRADE_MOUNT,
    UPGRADE_VARS,
    UPGRADE_VERSION,
    Measured,
    head_command,
    measured,
    placed,
    standin_vars,
    status,
    upgrade_wheels,
)
from tools.rackbox.playbooks import Run, bootstrap
from tools.rackbox.spec import HostSpec
from tools.rackbox.wheelhouse import ensure_wheelhouse

pytestmark = [pytest.mark.integration, pytest.mark.lifecycle]

PREFIX = os.environ.get("RACKSERVE_LIFECYCLE_RACK_PREFIX", "rbl")
NETWORK = os.environ.get("RACKSERVE_LIFECYCLE_RACK_NETWORK", "10.231.14.0/24")


@pytest.fixture(scope="module")
def upgrade_wheel() -> Iterator[Path]:
    """A directory holding rackserve's wheel with version UPGRADE_VERSION."""
    with upgrade_wheels(sys.executable) as wheels:
        yield wheels


@pytest.fixture(scope="module")
def rack(upgrade_wheel: Path) -> Iterator[Rack]:
    """Four booted hosts; the inventory lists the first three (the fourth is added later)."""
    pytest.importorskip("ansible_runner", reason="the bootstrap extra is not installed")
    try:
        check_machine()
    except RackUnavailable as exc:
        skip_or_fail(str(exc))
    wheelhouse = ensure_wheelhouse()
    box = Rack(4, prefix=PREFIX, network=NETWORK, wheelhouse=wheelhouse.path,
               prefetch=SITE_DEBS, binds={upgrade_wheel: UPGRADE_MOUNT}, replace=True,
               stop_timeout_s=10)  # fmt: skip  # nothing to drain when it goes
    for booted_rack in booted(box):
        listed = list(booted_rack.hosts[:3])
        booted_rack.write_inventory(extra_vars=standin_vars(listed[1:]), hosts=listed)
        yield booted_rack


@pytest.fixture(scope="module")
def converged(rack: Rack) -> Run:
    run = bootstrap(rack)
    assert run.result.ok, run.explain()
    wait_answering(SERVE_PORT, list(MODELS), 120, host=rack.hosts[0].ip)
    return run


def assert_none_failed(step: Measured) -> None:
    for model_id, answered in step.answered().items():
        assert step.failed()[model_id] == 0, step.describe()
        assert answered > 5, step.describe()


def test_drain_moves_a_model_with_no_failed_request_and_undrain_moves_nothing(
    rack: Rack, converged: Run
) -> None:
    before = placed(rack)
    node = before["a"]
    step = measured(rack, f"rackserve drain {node}", lambda: head_command(
        rack, "drain", node, "--cluster", CLUSTER_PATH
    ))  # fmt: skip
    assert_none_failed(step)
    assert f"node {node} is drained" in step.result.stdout, step.result.stdout
    after = placed(rack)
    assert after["a"] != node, after
    assert status(rack)["drained"] == [node]
    undrained = head_command(rack, "undrain", node, "--cluster", CLUSTER_PATH)
    assert f"node {node} is back in service" in undrained.stdout, undrained.stdout
    assert placed(rack) == after
    assert status(rack)["drained"] == []


def venv_version(rack: Rack, host: HostSpec) -> str:
    shown = rack.ssh(
        host,
        "/opt/rackserve/venv/bin/python -c "
        "\"import importlib.metadata as m; print(m.version('rackserve'))\"",
    )
    return shown.stdout.strip()


def test_upgrade_rolls_a_new_rackserve_over_the_workers(rack: Rack, converged: Run) -> None:
    head, workers = rack.hosts[0], rack.hosts[1:3]  # the fourth is not in the rack yet
    extravars = {"skip_confirmation": True, "upgrade_head": False, **UPGRADE_VARS}
    step = measured(rack, "upgrade.yml over two workers", lambda: bootstrap(
        rack, "upgrade", extravars=extravars
    ))  # fmt: skip
    assert step.result.result.ok, step.result.explain()
    assert_none_failed(step)
    for worker in workers:
        assert venv_version(rack, worker) == UPGRADE_VERSION
    assert venv_version(rack, head) != UPGRADE_VERSION
    shown = status(rack)
    assert shown["drained"] == []
    assert all(m["healthy"] for m in shown["models"]), shown


def test_scale_adds_a_worker_without_touching_the_engines(rack: Rack, converged: Run) -> None:
    head, workers = rack.hosts[0], list(rack.hosts[1:])
    since = {m["model_id"]: m["since"] for m in status(rack)["models"]}
    assert all(since.values()), since
    # The fourth host joins the inventory, which now asks for the upgraded rackserve
    rack.write_inventory(extra_vars={**standin_vars(workers), **UPGRADE_VARS})
    step = measured(rack, "scale.yml, one new worker", lambda: bootstrap(
        rack, "scale", extravars={"skip_confirmation": True}
    ))  # fmt: skip
    assert step.result.result.ok, step.result.explain()
    assert_none_failed(step)
    changed = step.result.changed()
    assert changed[workers[2].name] > 0, changed
    assert changed[workers[0].name] == changed[workers[1].name] == 0, changed
    assert venv_version(rack, workers[2]) == UPGRADE_VERSION
    nodes = [n for n in wait_for_alive_nodes(rack, 4) if n["alive"]]
    assert sorted(n["ip"] for n in nodes) == sorted(h.ip for h in rack.hosts), nodes
    assert {m["model_id"]: m["since"] for m in status(rack)["models"]} == since
    # deploy_models writes the cluster file with the new worker; the models stay where they run
    again = bootstrap(rack, tags="deploy_models")
    assert again.result.ok, again.explain()
    assert "nothing to change" in again.output, again.explain()
    assert head.name not in placed(rack).values()


def test_remove_node_resets_a_worker_and_forgets_a_dead_one(rack: Rack, converged: Run) -> None:
    head = rack.hosts[0]
    workers = {h.name: h for h in rack.hosts[1:]}
    gone = placed(rack)["a"]
    step = measured(rack, f"remove-node.yml {gone}", lambda: bootstrap(
        rack, "remove-node", extravars={"node": gone, "skip_confirmation": True}
    ))  # fmt: skip
    assert step.result.result.ok, step.result.explain()
    assert_none_failed(step)
    assert gone not in placed(rack).values()
    left = rack.ssh(
        workers[gone],
        "systemctl list-units --all --no-legend 'rackserve-*'; ls -d /opt/rackserve "
        "/var/lib/rackserve 2>/dev/null; pgrep -a raylet; true",
    )
    assert left.stdout.strip() == "", left.stdout
    alive = {n["ip"] for n in wait_for_alive_nodes(rack, 3) if n["alive"]}
    assert workers[gone].ip not in alive

    dead = placed(rack)["b"]
    rack.power_cut(workers[dead])
    refused = bootstrap(rack, "remove-node", extravars={"node": dead, "skip_confirmation": True})
    assert not refused.result.ok
    assert "unreachable; nothing was changed" in refused.output, refused.explain()
    forgotten = bootstrap(
        rack,
        "remove-node",
        extravars={"node": dead, "allow_unreachable": True, "skip_confirmation": True},
    )
    assert forgotten.result.ok, forgotten.explain()
    after = placed(rack)
    assert dead not in after.values()
    assert gone not in after.values()
    wait_answering(SERVE_PORT, list(MODELS), 300, host=head.ip)
    shown = status(rack)
    assert sorted(shown["drained"]) == sorted([gone, dead])
    assert all(m["healthy"] for m in shown["models"]), shown
