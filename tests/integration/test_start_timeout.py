"""An engine whose placement Ray never schedules is removed after the start timeout, on a real
local Ray cluster: a stand-in planned on a GPU the worker does not have waits for good, so the
wave gives up, deletes it and says so, and the next deploy can start it afresh."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tools.local_ray import HEAD_IP, RayCluster, free_port

pytestmark = pytest.mark.integration

SCRIPT = """
import sys
from ray import serve
from deployer.config.cluster import NODE_LABEL, Cluster, Gpu, Node
from deployer.config.models_config import parse_models_config
from deployer.planning.placement import Demand, plan_placements
from deployer.planning.serve_config import engine_specs
from deployer.serving.launch import LaunchError, _start_engines
from deployer.serving.probe import connect

connect(sys.argv[1])
serve.start(http_options={"host": sys.argv[2], "port": int(sys.argv[3])})
models = parse_models_config("models: [{model_id: ghost, gpu_memory_gib: 10}]")
gpu = Gpu(index=0, name="NVIDIA H100 80GB HBM3", memory_total_mib=81559, memory_free_mib=81000)
cluster = Cluster(nodes=[Node(name="worker", gpus=[gpu], labels={NODE_LABEL: "worker"})])
plan = plan_placements(cluster, [Demand("ghost", 1, 10 * 2**30)])
app = "rackserve-model:ghost"
try:
    _start_engines(engine_specs(plan, models, cluster), print, "standin", {"ghost": app}, 8.0)
except LaunchError as exc:
    print("LAUNCH-ERROR", exc)
print("LEFT", app in serve.status().applications)
"""


def test_an_engine_ray_never_schedules_is_removed_after_the_start_timeout(
    ray_cluster: RayCluster,
) -> None:
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, ray_cluster.address, HEAD_IP, str(free_port(HEAD_IP))],
        capture_output=True, text=True, env=env, timeout=240, check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-3000:]
    assert "wave 1/1: starting ghost@worker" in out, out
    assert "LAUNCH-ERROR rackserve-model:ghost (ghost@worker) did not run within 8 s" in out, out
    assert "removed, so that the next deploy starts them afresh" in out, out
    assert "LEFT False" in out, out
