"""A head restart with GCS persistence: Serve comes back by itself, with no deploy run by hand.

A real local Ray cluster on loopback: a head whose GCS keeps its tables in RocksDB
(`RAY_gcs_storage=rocksdb`, the ray_head role's default) and a worker with 2 logical H100s
running two stand-in engines. A client thread per model asks throughout. The head is killed
(SIGKILL, every process at once) and started again with the same settings. Asserted: the worker
stays the same Ray node (its raylet reconnects), both models answer again through the head's
endpoint within a bound, nothing deployed them (the state directory logs no pass and no deploy
after the first), and they run where the plan put them.

While the head is away its HTTP proxy and the ingress are away too, so requests fail for those
seconds on this one-address cluster; on a rack with `--http-host 0.0.0.0` every node runs a
proxy (README, "When things fail").
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployer.serving.applications import model_app_name
from deployer.serving.state import FileStateStore
from tests.integration import rehearsal
from tests.integration.faults import Driver, start_driver, status
from tools.client_loop import ClientLoop, wait_answering
from tools.local_ray import restart_head, start_ray_cluster
from tools.serve_processes import replica_pids

pytestmark = [pytest.mark.integration, pytest.mark.fault]

WORKER = "gpu-a"
CLUSTER_FILE = json.dumps(
    {
        "nodes": [
            {
                "name": WORKER,
                "gpus": [
                    {
                        "index": i,
                        "name": "NVIDIA H100 80GB HBM3",
                        "memory_total_mib": 81559,
                        "memory_free_mib": 81000,
                    }
                    for i in range(2)
                ],
            }
        ]
    }
)
MODELS = [
    {"model_id": "first", "gpu_memory_gib": 50.0},
    {"model_id": "second", "gpu_memory_gib": 50.0},
]
DOWN_S = 5.0
BACK_WITHIN_S = 180.0


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    yield from start_driver("rs-hr-")


def test_a_restarted_head_serves_again_by_itself(driver: Driver) -> None:
    state_dir = str(driver.base / "state")
    persistence = {"RAY_gcs_storage": "rocksdb", "RAY_gcs_storage_path": str(driver.base / "gcs")}
    with start_ray_cluster(
        driver.base / "nodes",
        ("head", WORKER),
        worker_args=("--num-gpus=2", "--num-cpus=16"),
        head_env=persistence,
    ) as cluster:
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
        model_ids = [m["model_id"] for m in MODELS]
        wait_answering(driver.port, model_ids, 120)
        worker = cluster.nodes[1]
        engines_before = replica_pids(cluster.address)
        with ClientLoop(driver.port, model_ids) as loop:
            for model_id in model_ids:
                loop.wait_answered(model_id, time.monotonic(), 120)
            killed = time.monotonic()
            restart_head(cluster, down_s=DOWN_S)
            restarted = time.monotonic()
            back = {m: loop.wait_answered(m, restarted, BACK_WITHIN_S) - killed for m in model_ids}
            time.sleep(3)
        assert worker.process.poll() is None, "the worker's `ray start` exited"
        alive = driver.submit(rehearsal.alive_nodes, cluster.address)
        assert alive == sorted(["head", WORKER]), alive
        reports = driver.submit(rehearsal.read_reports, cluster.address, model_ids)
        shown = status(cluster.address, state_dir)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        engines_after = replica_pids(cluster.address)

    failed = {m: len(c.failed) for m, c in loop.counts.items()}
    answered = {m: len(c.answered) for m, c in loop.counts.items()}
    print(
        f"\nhead restart (RocksDB GCS): killed, started again {restarted - killed:.1f} s later; "
        f"answering again after (s) { ({m: round(t, 1) for m, t in back.items()}) }; "
        f"requests answered {answered}, failed {failed}"
    )
    for p in first.plan.placements:  # where the plan put them
        assert (reports[p.model_id].node, sorted(reports[p.model_id].gpus)) == (
            p.node,
            sorted(p.gpus),
        )
    # The engines on the worker were not replaced: Serve's recovered controller kept the
    # replicas that lived through the head's absence (vLLM's logging setup used to close
    # Serve's log handler in them, and recovery then replaced every one).
    for model_id in model_ids:
        app = model_app_name(model_id)
        assert engines_after[app] == engines_before[app], (engines_before, engines_after)
    events = [e["event"] for e in FileStateStore(Path(state_dir)).events()]
    assert events == ["deployed"], events  # nothing but the first deploy: Serve came back itself
