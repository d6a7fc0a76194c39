"""Self-healing under fault: a cold start and a lost node, each brought back by one reconcile pass.

A real local Ray cluster on loopback (a head and three workers with 2 logical H100s each) runs
three stand-in engines: `stay` (pinned to gpu-a), `mover` and `big` (tensor parallel 2). A client
thread per model sends requests throughout and counts every answer. The node holding `big` is
killed with SIGKILL (every process of its Ray node at once, a power cut); once Ray shows it dead,
one reconcile pass re-plans without it. Asserted: the models on the other nodes failed 0
requests, `big` answers again from a surviving node on the GPUs the new plan printed, and the
state directory logged the pass.

The stand-in serves no tokens: an answer is its refusal (HTTP 501 naming the stand-in), which
proves the request went through the proxy, the ingress and a live engine replica and back.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployer.serving.state import FileStateStore
from tests.integration import rehearsal
from tests.integration.faults import Driver, start_driver, status
from tools.client_loop import ClientLoop, wait_answering
from tools.local_ray import (
    RayCluster,
    WorkerSpec,
    kill_node,
    start_ray_cluster,
)

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
MODELS = [
    {"model_id": "stay", "gpu_memory_gib": 60.0, "node": "gpu-a"},
    {"model_id": "mover", "gpu_memory_gib": 60.0},
    {"model_id": "big", "gpu_memory_gib": 60.0, "tensor_parallel_size": 2},
]
DEAD_WITHIN_S = 120.0
BACK_WITHIN_S = 400.0


@contextlib.contextmanager
def ray_cluster(base: Path) -> Iterator[RayCluster]:
    """A head and the three workers, each with 2 logical GPUs; stopped by PID on exit."""
    with start_ray_cluster(
        base,
        ("head", WORKERS[0]),
        worker_args=("--num-gpus=2", "--num-cpus=16"),
        extra_workers=[WorkerSpec(n, ("--num-gpus=2", "--num-cpus=16")) for n in WORKERS[1:]],
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    yield from start_driver("rs-nl-")


def test_a_cold_start_brings_back_what_was_deployed(driver: Driver) -> None:
    """The whole cluster stopped and started empty (a head restart without GCS persistence):
    one pass redeploys the record from the state directory, on the same nodes and GPUs."""
    state_dir = str(driver.base / "cold-state")
    with ray_cluster(driver.base / "before") as cluster:
        first = driver.submit(
            rehearsal.deploy_standin,
            MODELS,
            CLUSTER_FILE,
            cluster.address,
            driver.port,
            0.0,
            state_dir,
        )
        assert first.plan is not None, first.output
    with ray_cluster(driver.base / "after") as cluster:
        # `rackserve status` reads what should run from the state directory: nothing does.
        before = status(cluster.address, state_dir)
        assert before.returncode == 4, before.stderr
        shown = json.loads(before.stdout)
        assert [m["model_id"] for m in shown["models"]] == [m["model_id"] for m in MODELS]
        assert not any(m["healthy"] for m in shown["models"])
        started = time.monotonic()
        said = driver.submit(
            rehearsal.reconcile_standin, CLUSTER_FILE, cluster.address, 1, state_dir
        )
        assert said.startswith("deploy: nothing runs"), said
        wait_answering(driver.port, [m["model_id"] for m in MODELS], 120)
        back = time.monotonic() - started
        reports = driver.submit(
            rehearsal.read_reports, cluster.address, [m["model_id"] for m in MODELS]
        )
        after = status(cluster.address, state_dir)
        assert after.returncode == 0, after.stdout + after.stderr
        assert all(m["healthy"] for m in json.loads(after.stdout)["models"])
    print(f"\ncold start: every model answered {back:.1f} s after the pass began")
    for p in first.plan.placements:  # the same nodes and GPUs as before the stop
        assert (reports[p.model_id].node, reports[p.model_id].gpus) == (p.node, p.gpus)
    events = FileStateStore(Path(state_dir)).events()
    assert [e["event"] for e in events][-2:] == ["reconcile", "deployed"]


def test_a_lost_node_s_model_is_re_placed_and_the_others_fail_nothing(driver: Driver) -> None:
    with ray_cluster(driver.base / "loss") as cluster:
        node_loss(driver, cluster)


def node_loss(rack: Driver, cluster: RayCluster) -> None:
    address = cluster.address
    state_dir = str(rack.base / "loss-state")
    first = rack.submit(
        rehearsal.deploy_standin, MODELS, CLUSTER_FILE, address, rack.port, 0.0, state_dir
    )
    assert first.plan is not None, first.output
    where = {p.model_id: p.node for p in first.plan.placements}
    victim = where["big"]
    assert victim not in (where["stay"], where["mover"]), where
    survivors = [m for m in where if where[m] != victim]

    # Counting starts once the endpoint answers for every model (the proxy learns new routes a
    # moment after deploy returns): what is counted is what the fault does.
    wait_answering(rack.port, list(where), 120)
    # 30 s per request: a new stand-in replica's first answer waits for vLLM's import (10 s).
    with ClientLoop(rack.port, list(where), timeout_s=30) as loop:
        start = time.monotonic()
        for model_id in where:
            loop.wait_answered(model_id, start, 120)
        killed = time.monotonic()
        kill_node(next(n for n in cluster.nodes if n.name == victim))
        deadline = killed + DEAD_WITHIN_S
        while victim in rack.submit(rehearsal.alive_nodes, address):
            assert time.monotonic() < deadline, f"Ray still shows {victim} alive"
            time.sleep(2)
        seen_dead = time.monotonic()
        said = rack.submit(rehearsal.reconcile_standin, CLUSTER_FILE, address, rack.port, state_dir)
        assert said.startswith("deploy:"), said
        assert "the ingress serves the same models: left running" in said, said
        back = loop.wait_answered("big", seen_dead, BACK_WITHIN_S)
        time.sleep(5)  # the others keep being asked after the move too

    counts = loop.counts
    report = {
        m: (len(c.answered), f"slowest {c.slowest[0]:.2f} s", c.failures_by_reason(since=killed))
        for m, c in counts.items()
    }
    print(
        f"\nnode loss: {victim} killed; Ray showed it dead after {seen_dead - killed:.1f} s; "
        f"big answered again {back - killed:.1f} s after the kill; per model: requests answered, "
        f"the slowest answer, each failure (count, first and last sent, s after the kill): "
        f"{report}"
    )
    for model_id in survivors:
        assert counts[model_id].failed == [], f"{model_id} failed requests: {report[model_id]}"
        assert len(counts[model_id].answered) > 10
    # A request in flight to big's engine when its node died waits until Ray and Serve see the
    # loss; none sent after Ray showed the node dead waits out the client's timeout, and while
    # big moves, a request for it gets a prompt 503 naming it.
    after = [why for sent, why in counts["big"].failed if sent > seen_dead]
    assert after, "big was never refused while it moved"
    assert all(why.startswith("HTTP 503: model 'big' is not serving") for why in after), report

    reports = rack.submit(rehearsal.read_reports, address, list(where))
    big = reports["big"]
    assert big.node != victim
    record = FileStateStore(Path(state_dir)).read()
    assert record is not None
    placed = {p["model_id"]: p for p in record.placements}
    assert placed["big"]["node"] == big.node != victim
    assert sorted(big.gpus) == sorted(placed["big"]["gpus"])
    assert placed["stay"]["node"] == where["stay"]
    events = FileStateStore(Path(state_dir)).events()
    assert any(e["event"] == "reconcile" and e["lost"] == [victim] for e in events), events
