"""Day-2 changes while every model answers: drain, a changed setting, undrain, a refused drain.

A real local Ray cluster on loopback (a head and three workers with 2 logical H100s each) runs
three stand-in engines of 60 GiB, one per GPU. A client thread per model sends requests
throughout each change and counts every answer. Asserted for each change: 0 failed requests,
per model; the engines run where the new plan says; the record and the event log say so.

The stand-in serves no tokens: an answer is its refusal (HTTP 501 naming the stand-in), which
proves the request went through the proxy, the ingress and a live engine replica and back.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployer.planning.redeploy import Deployed
from deployer.serving.applications import app_model
from deployer.serving.launch import HttpSettingsError
from deployer.serving.state import FileStateStore
from tests.integration import rehearsal
from tests.integration.faults import Driver, start_driver, status
from tools.certificates import self_signed
from tools.client_loop import ClientLoop, wait_answering
from tools.local_ray import HEAD_IP, RayCluster, WorkerSpec, start_ray_cluster

pytestmark = [pytest.mark.integration, pytest.mark.fault]

H100 = "NVIDIA H100 80GB HBM3"
WORKERS = ("gpu-a", "gpu-b", "gpu-c")
CLUSTER_FILE = json.dumps(
    {
        "nodes": [
            {
                "name": name,
                "gpus": [
                    {"index": i, "name": H100, "memory_total_mib": 81559, "memory_free_mib": 81000}
                    for i in range(2)
                ],
            }
            for name in WORKERS
        ]
    }
)
MODELS = [{"model_id": m, "gpu_memory_gib": 60.0} for m in ("one", "two", "three")]
IDS = [m["model_id"] for m in MODELS]


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    yield from start_driver("rs-d2-")


@pytest.fixture(scope="module")
def cluster(driver: Driver) -> Iterator[RayCluster]:
    """A head and the three workers, each with 2 logical GPUs; stopped by PID on exit."""
    with start_ray_cluster(
        driver.base / "ray",
        ("head", WORKERS[0]),
        worker_args=("--num-gpus=2", "--num-cpus=16"),
        extra_workers=[WorkerSpec(n, ("--num-gpus=2", "--num-cpus=16")) for n in WORKERS[1:]],
    ) as started:
        yield started


@pytest.fixture(scope="module")
def deployed(driver: Driver, cluster: RayCluster) -> str:
    """The three models deployed; the state directory's path."""
    state_dir = str(driver.base / "state")
    first = driver.submit(
        rehearsal.deploy_standin, MODELS, CLUSTER_FILE, cluster.address, driver.port, 0.0, state_dir
    )
    assert first.plan is not None, first.output
    wait_answering(driver.port, IDS, 120)
    return state_dir


def record(state_dir: str) -> Deployed:
    found = FileStateStore(Path(state_dir)).read()
    assert found is not None
    return found


def places(state_dir: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {p["model_id"]: (p["node"], tuple(p["gpus"])) for p in record(state_dir).placements}


def while_asking(driver: Driver, change: Any, *args: Any) -> tuple[Any, dict[str, Any]]:
    """Run `change(*args)` in the driver while every model is asked throughout; what it
    returned, and each model's counts (asked for 5 s more after it returned)."""
    with ClientLoop(driver.port, IDS, pause_s=0.05, timeout_s=30) as loop:
        start = time.monotonic()
        for model_id in IDS:
            loop.wait_answered(model_id, start, 60)
        said = driver.submit(change, *args)
        time.sleep(5)
    return said, loop.counts


def assert_none_failed(what: str, counts: dict[str, Any]) -> None:
    report = {m: (len(c.answered), c.failures_by_reason(since=0.0)) for m, c in counts.items()}
    print(f"\n{what}: per model, requests answered and failures: {report}")
    for model_id, count in counts.items():
        assert count.failed == [], f"{what}: {model_id} failed requests: {report[model_id]}"
        assert len(count.answered) > 5, report


def test_draining_a_node_moves_its_models_and_no_request_fails(
    driver: Driver, cluster: RayCluster, deployed: str
) -> None:
    before = places(deployed)
    busiest = max(WORKERS, key=lambda n: sum(node == n for node, _ in before.values()))
    moved = sorted(m for m, (node, _) in before.items() if node == busiest)
    said, counts = while_asking(
        driver, rehearsal.drain_standin, busiest, True, CLUSTER_FILE, cluster.address, deployed
    )
    assert f"node {busiest} is drained" in said, said
    assert "error:" not in said, said
    assert_none_failed(f"drain {busiest} (moving {', '.join(moved)})", counts)
    after = places(deployed)
    assert all(node != busiest for node, _ in after.values()), after
    assert {m: after[m] for m in IDS if m not in moved} == {
        m: before[m] for m in IDS if m not in moved
    }
    reports = driver.submit(rehearsal.read_reports, cluster.address, IDS)
    for model_id in IDS:  # the engines that answer run where the record says
        assert (reports[model_id].node, tuple(sorted(reports[model_id].gpus))) == (
            after[model_id][0],
            tuple(sorted(after[model_id][1])),
        )
    apps = driver.submit(rehearsal.applications, cluster.address)
    assert len([a for a in apps if a.startswith("rackserve-model:")]) == 3, apps  # old ones gone
    assert record(deployed).drained == [busiest]
    shown = status(cluster.address, deployed)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert json.loads(shown.stdout)["drained"] == [busiest]
    events = [e["event"] for e in FileStateStore(Path(deployed)).events()]
    assert events[-2:] == ["deployed", "drained"], events


def test_the_ingress_reads_serve_as_serve_status_does(
    driver: Driver, cluster: RayCluster, deployed: str
) -> None:
    # The ingress reads the controller's details as plain data (cheaper than serve.status(),
    # which validates them): after the drain's moves (engines in both slots), both readings
    # must give every application the same status, deploy time and replica counts.
    del deployed
    status, plain = driver.submit(rehearsal.routing_views, cluster.address, IDS)
    apps, routes = status
    assert sum(app_model(name) is not None for name in apps) >= len(IDS), apps
    assert all(routes[m] is not None for m in IDS), routes
    assert plain == status


def test_a_changed_setting_starts_the_new_engine_first_and_no_request_fails(
    driver: Driver, cluster: RayCluster, deployed: str
) -> None:
    changed = [dict(m) | {"max_num_seqs": 8} if m["model_id"] == "two" else m for m in MODELS]
    before = places(deployed)
    result, counts = while_asking(
        driver,
        rehearsal.deploy_standin,
        changed,
        CLUSTER_FILE,
        cluster.address,
        driver.port,
        0.0,
        deployed,
    )
    assert "new engines of two serve" in result.output, result.output
    assert_none_failed("max_num_seqs of two changed", counts)
    after = places(deployed)
    assert {m: after[m] for m in ("one", "three")} == {m: before[m] for m in ("one", "three")}
    assert after["two"] != before["two"]  # beside the old engine, so on another GPU
    assert record(deployed).drained != []  # a deploy keeps the drained node drained


def test_undrain_moves_nothing_and_a_drain_without_room_changes_nothing(
    driver: Driver, cluster: RayCluster, deployed: str
) -> None:
    (drained,) = record(deployed).drained
    before = places(deployed)
    said = driver.submit(
        rehearsal.drain_standin, drained, False, CLUSTER_FILE, cluster.address, deployed
    )
    assert f"node {drained} is back in service" in said, said
    assert places(deployed) == before
    assert record(deployed).drained == []

    # two of three workers drained leave two GPUs for three 60 GiB models: refused, nothing moves
    first, second = (n for n in WORKERS if n != drained)
    driver.submit(rehearsal.drain_standin, first, True, CLUSTER_FILE, cluster.address, deployed)
    apps = driver.submit(rehearsal.applications, cluster.address)
    refused = driver.submit(
        rehearsal.drain_standin, second, True, CLUSTER_FILE, cluster.address, deployed
    )
    assert "error: draining " + second + " leaves no room for " in refused, refused
    assert "nothing was changed" in refused
    assert record(deployed).drained == [first]
    assert driver.submit(rehearsal.applications, cluster.address) == apps

    forced = driver.submit(
        rehearsal.drain_standin, second, True, CLUSTER_FILE, cluster.address, deployed, True
    )
    assert f"node {second} is drained" in forced, forced
    assert sorted(record(deployed).drained) == sorted([first, second])
    assert len(record(deployed).unplaced()) == 1
    shown = status(cluster.address, deployed)
    assert shown.returncode == 4  # a model is unplaced: not everything serves
    document = json.loads(shown.stdout)
    assert sorted(document["drained"]) == sorted([first, second])
    assert [m["state"] for m in document["models"]].count("UNPLACED") == 1


def listed(url: str, context: ssl.SSLContext | None = None) -> list[str]:
    """The model ids `GET /v1/models` lists."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30, context=context) as answer:
        return sorted(m["id"] for m in json.load(answer)["data"])


def test_tls_is_refused_while_models_run_then_serves_https_only(
    driver: Driver, cluster: RayCluster, deployed: str
) -> None:
    """TLS reaches Serve's HTTP options, which Serve applies only when it starts: asked for while
    models run, the deploy refuses and nothing changes; after `down`, the deploy restarts Serve
    with the certificate, `https://` answers and plain `http://` gets no HTTP answer."""
    tls = self_signed(driver.base, HEAD_IP)
    plain = f"http://{HEAD_IP}:{driver.port}"
    apps = driver.submit(rehearsal.applications, cluster.address)
    served = listed(plain)  # the models placed (the test before leaves one unplaced)
    with pytest.raises(HttpSettingsError, match=r"ssl_certfile None -> .*cert\.pem.*nothing was"):
        driver.submit(
            rehearsal.deploy_standin,
            MODELS, CLUSTER_FILE, cluster.address, driver.port, 0.0, deployed, tls,
        )  # fmt: skip
    assert driver.submit(rehearsal.applications, cluster.address) == apps
    assert listed(plain) == served  # still plain HTTP

    driver.submit(rehearsal.down_all, cluster.address, deployed)
    secured = driver.submit(
        rehearsal.deploy_standin,
        MODELS, CLUSTER_FILE, cluster.address, driver.port, 0.0, deployed, tls,
    )  # fmt: skip
    assert "Serve restarts to apply the new HTTP settings" in secured.output, secured.output
    assert f"at https://{HEAD_IP}:{driver.port}/v1" in secured.output, secured.output
    trusted = ssl.create_default_context(cafile=tls[0])
    deadline = time.monotonic() + 120
    while True:
        try:
            assert listed(f"https://{HEAD_IP}:{driver.port}", trusted) == sorted(IDS)
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)) as no:
        listed(plain)
    assert not isinstance(no.value, urllib.error.HTTPError), no.value  # no HTTP answer at all
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        listed(f"https://{HEAD_IP}:{driver.port}", ssl.create_default_context())
    shown = status(cluster.address, deployed)
    assert json.loads(shown.stdout)["tls"] is True, shown.stdout
