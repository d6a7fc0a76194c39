"""Day-2 playbooks on a 4-host rack-in-a-box while every model answers (marker `lifecycle`).

The rack boots four hosts; the inventory lists the head and two workers, and site.yml deploys
two models (the stand-in engine on CPU nodes, not pinned; a cluster file lists the workers).
A client loop asks every model through the head's endpoint throughout each step and counts
each request's answer, per model. In order, on one rack:
- scale.yml adds the third worker: Ray lists four nodes, the engines' replicas keep their start
  times, and no request fails;
- `rackserve drain` of the worker serving `a` moves it to another worker, no request fails;
  undrain moves nothing back;
- upgrade.yml rolls rackserve's own version (a wheel with a bumped version, bind-mounted in
  the hosts) over the workers, each drained, upgraded, rejoined and undrained in turn, with no
  failed request; then over the head, after which every model answers again (requests fail
  while the head's Ray restarts: its HTTP proxy and the ingress run there);
- remove-node.yml resets a worker, which leaves Ray; then, on a worker whose power was cut,
  with allow_unreachable, its model is re-placed.

The stand-in serves no tokens: an answer is its refusal (HTTP 501 naming the stand-in), which
proves the request went through the proxy, the ingress and a live engine replica and back.
About 30 minutes on 2 cores (`nox -s lifecycle`).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.rack.conftest import booted, skip_or_fail
from tests.rack.playbooks import Run, bootstrap
from tools.client_loop import ClientLoop, Counts, wait_answering
from tools.rackbox import Rack, RackUnavailable, check_machine
from tools.rackbox.cluster import RAY_PORT, RAY_VARS, SITE_DEBS, wait_for_alive_nodes
from tools.rackbox.spec import HostSpec
from tools.rackbox.wheelhouse import build_rackserve_wheel, ensure_wheelhouse

pytestmark = [pytest.mark.integration, pytest.mark.lifecycle]

PREFIX = os.environ.get("RACKSERVE_LIFECYCLE_RACK_PREFIX", "rbl")
NETWORK = os.environ.get("RACKSERVE_LIFECYCLE_RACK_NETWORK", "10.231.14.0/24")
SERVE_PORT = 8000
MODELS = ["a", "b"]
UPGRADE_VERSION = "0.1.0.post1"
UPGRADE_MOUNT = "/srv/upgrade"
STATE_DIR = "/var/lib/rackserve/state"


def cluster_file(workers: list[HostSpec]) -> dict[str, Any]:
    """The workers as CPU nodes (the head takes no engine): deploy_models' cluster file."""
    return {"nodes": [{"name": w.name, "gpus": [], "cpu_memory_mib": 6144} for w in workers]}


def rack_vars(workers: list[HostSpec]) -> dict[str, Any]:
    return {
        **RAY_VARS,
        "ray_worker_num_cpus": 4,  # each engine replica holds a Ray CPU; the hosts have 2 cores
        "deploy_models_engine": "standin",
        "deploy_models_models": [{"model_id": m, "gpu_memory_gib": 2} for m in MODELS],
        "deploy_models_cluster": cluster_file(workers),
        "deploy_models_controller_grace_s": 10,
        "deploy_models_controller_interval_s": 5,
    }


@pytest.fixture(scope="module")
def upgrade_wheel() -> Iterator[Path]:
    """A directory holding rackserve's wheel with version UPGRADE_VERSION."""
    with tempfile.TemporaryDirectory(prefix="rackserve-upgrade-") as scratch:
        built = build_rackserve_wheel(
            sys.executable, Path(scratch) / "build", version=UPGRADE_VERSION
        )
        assert UPGRADE_VERSION in built.name, built
        wheels = Path(scratch) / "wheels"
        wheels.mkdir()
        built.rename(wheels / built.name)
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
               prefetch=SITE_DEBS, binds={upgrade_wheel: UPGRADE_MOUNT}, replace=True)  # fmt: skip
    for booted_rack in booted(box):
        listed = list(booted_rack.hosts[:3])
        booted_rack.write_inventory(extra_vars=rack_vars(listed[1:]), hosts=listed)
        yield booted_rack


@pytest.fixture(scope="module")
def converged(rack: Rack) -> Run:
    run = bootstrap(rack)
    assert run.result.ok, run.explain()
    wait_answering(SERVE_PORT, MODELS, 120, host=rack.hosts[0].ip)
    return run


def head_command(rack: Rack, *argv: str, check: bool = True) -> Any:
    """`rackserve ARGV --address HEAD --state-dir ...` on the head."""
    head = rack.hosts[0]
    line = shlex.join(
        ["rackserve", *argv, "--address", f"{head.ip}:{RAY_PORT}", "--state-dir", STATE_DIR]
    )
    return rack.ssh(head, line, check=check, timeout=600)


def status(rack: Rack) -> dict[str, Any]:
    shown = head_command(rack, "status", "--json", "-", check=False)
    document: dict[str, Any] = json.loads(shown.stdout)
    return document


def placed(rack: Rack) -> dict[str, str]:
    """Per model, the node the head's state directory places it on."""
    shown = rack.ssh(rack.hosts[0], f"cat {STATE_DIR}/deployed.json").stdout
    return {p["model_id"]: p["node"] for p in json.loads(shown)["placements"]}


def asking(rack: Rack) -> ClientLoop:
    return ClientLoop(SERVE_PORT, MODELS, pause_s=0.2, host=rack.hosts[0].ip, timeout_s=30)


def report(what: str, counts: dict[str, Counts], since: float) -> dict[str, Any]:
    found = {
        m: (len(c.answered), c.failures_by_reason(since=since)) for m, c in counts.items()
    }  # fmt: skip
    print(f"\n{what}: per model, requests answered and failures (count, first, last s): {found}")
    return found


def assert_none_failed(what: str, counts: dict[str, Counts], since: float) -> None:
    found = report(what, counts, since)
    for model_id, count in counts.items():
        assert count.failed == [], f"{what}: {model_id} failed requests: {found[model_id]}"
        assert len(count.answered) > 5, found


def timed(what: str, step: Any) -> Any:
    started = time.monotonic()
    result = step()
    print(f"\n{what}: {time.monotonic() - started:.1f} s")
    return result


def test_scale_adds_a_worker_without_touching_the_engines(rack: Rack, converged: Run) -> None:
    head, workers = rack.hosts[0], list(rack.hosts[1:])
    since = {m["model_id"]: m["since"] for m in status(rack)["models"]}
    assert all(since.values()), since
    rack.write_inventory(extra_vars=rack_vars(workers))  # the fourth host joins the inventory
    with asking(rack) as loop:
        started = time.monotonic()
        scaled = timed("scale.yml, one new worker", lambda: bootstrap(
            rack, "scale", extravars={"skip_confirmation": True}
        ))  # fmt: skip
        assert scaled.result.ok, scaled.explain()
        time.sleep(3)
    assert_none_failed("scale.yml", loop.counts, started)
    changed = scaled.changed()
    assert changed[workers[2].name] > 0, changed
    assert changed[workers[0].name] == changed[workers[1].name] == 0, changed
    nodes = [n for n in wait_for_alive_nodes(rack, 4) if n["alive"]]
    assert sorted(n["ip"] for n in nodes) == sorted(h.ip for h in rack.hosts), nodes
    assert {m["model_id"]: m["since"] for m in status(rack)["models"]} == since
    # deploy_models writes the cluster file with the new worker; the models stay where they run
    again = bootstrap(rack, tags="deploy_models")
    assert again.result.ok, again.explain()
    assert "nothing to change" in again.output, again.explain()
    assert head.name not in placed(rack).values()


def test_drain_moves_a_model_with_no_failed_request_and_undrain_moves_nothing(
    rack: Rack, converged: Run
) -> None:
    before = placed(rack)
    node = before["a"]
    with asking(rack) as loop:
        started = time.monotonic()
        drained = timed(f"rackserve drain {node}", lambda: head_command(
            rack, "drain", node, "--cluster", "/etc/rackserve/cluster.yaml"
        ))  # fmt: skip
        time.sleep(3)
    assert_none_failed(f"drain {node}", loop.counts, started)
    assert f"node {node} is drained" in drained.stdout, drained.stdout
    after = placed(rack)
    assert after["a"] != node, after
    assert status(rack)["drained"] == [node]
    undrained = head_command(rack, "undrain", node, "--cluster", "/etc/rackserve/cluster.yaml")
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


def test_upgrade_rolls_a_new_rackserve_over_the_workers_then_the_head(
    rack: Rack, converged: Run
) -> None:
    head, workers = rack.hosts[0], rack.hosts[1:]
    bump = {
        "skip_confirmation": True,
        "python_env_rackserve_requirement": f"rackserve=={UPGRADE_VERSION}",
        "python_env_pip_extra_args": ["--find-links", UPGRADE_MOUNT],
    }
    with asking(rack) as loop:
        started = time.monotonic()
        rolled = timed("upgrade.yml over three workers", lambda: bootstrap(
            rack, "upgrade", extravars={**bump, "upgrade_head": False}
        ))  # fmt: skip
        assert rolled.result.ok, rolled.explain()
        time.sleep(3)
    assert_none_failed("upgrade.yml, workers", loop.counts, started)
    for worker in workers:
        assert venv_version(rack, worker) == UPGRADE_VERSION
    assert venv_version(rack, head) != UPGRADE_VERSION
    assert status(rack)["drained"] == []
    with asking(rack) as loop:
        started = time.monotonic()
        rolled = timed("upgrade.yml, the head", lambda: bootstrap(
            rack, "upgrade", extravars={**bump, "upgrade_workers": False}
        ))  # fmt: skip
        assert rolled.result.ok, rolled.explain()
        for model_id in MODELS:
            loop.wait_answered(model_id, time.monotonic(), 300)
    report("upgrade.yml, the head (its proxy and the ingress restart)", loop.counts, started)
    assert venv_version(rack, head) == UPGRADE_VERSION
    shown = status(rack)
    assert all(m["healthy"] for m in shown["models"]), shown


def test_remove_node_resets_a_worker_and_forgets_a_dead_one(rack: Rack, converged: Run) -> None:
    head = rack.hosts[0]
    workers = {h.name: h for h in rack.hosts[1:]}
    gone = placed(rack)["a"]
    with asking(rack) as loop:
        started = time.monotonic()
        removed = timed(f"remove-node.yml {gone}", lambda: bootstrap(
            rack, "remove-node", extravars={"node": gone, "skip_confirmation": True}
        ))  # fmt: skip
        assert removed.result.ok, removed.explain()
        time.sleep(3)
    assert_none_failed(f"remove-node.yml {gone}", loop.counts, started)
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
    wait_answering(SERVE_PORT, MODELS, 300, host=head.ip)
    shown = status(rack)
    assert sorted(shown["drained"]) == sorted([gone, dead])
    assert all(m["healthy"] for m in shown["models"]), shown
