"""`probe_cluster` against a real two-node Ray cluster on this machine."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployer.config.cluster import dump_cluster, parse_cluster
from deployer.serving.probe import NODE_LABEL, ProbeError, probe_cluster
from tools.local_ray import HEAD_IP, WORKER_IP, RayCluster

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[serve]')")


def test_probe_reports_each_node_as_a_cpu_node(ray_cluster: RayCluster) -> None:
    cluster = probe_cluster(ray_cluster.address)

    assert [node.name for node in cluster.nodes] == ["head", "worker"]
    assert [node.ip for node in cluster.nodes] == [HEAD_IP, WORKER_IP]
    for node in cluster.nodes:
        assert node.is_cpu_node
        assert node.driver_version is None
        assert node.cpu_memory_mib is not None
        assert node.cpu_memory_mib > 0
        assert node.labels[NODE_LABEL] == node.name
        assert node.ray_node_id is not None
        assert node.labels["ray.io/node-id"] == node.ray_node_id
    assert len({node.ray_node_id for node in cluster.nodes}) == 2
    assert parse_cluster(dump_cluster(cluster), source="probe") == cluster
    assert not ray.is_initialized()  # the probe connected, so it disconnected


def test_probe_through_ray_client(ray_cluster: RayCluster) -> None:
    """From a machine outside the cluster, `ray://HEAD:10001` is the way in."""
    cluster = probe_cluster(ray_cluster.client_address)

    assert [(node.name, node.ip) for node in cluster.nodes] == [
        ("head", HEAD_IP),
        ("worker", WORKER_IP),
    ]
    assert not ray.is_initialized()


def test_auto_finds_the_cluster_started_in_ray_temp_dir(
    ray_cluster: RayCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TEMP_DIR", str(ray_cluster.nodes[0].temp_dir))

    cluster = probe_cluster("auto")

    assert [node.name for node in cluster.nodes] == ray_cluster.node_names


def test_probe_reuses_and_keeps_an_existing_connection(ray_cluster: RayCluster) -> None:
    ray.init(address=ray_cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        cluster = probe_cluster("ignored:1")
        assert ray.is_initialized()
        assert {node.ray_node_id for node in cluster.nodes} == {
            node["NodeID"] for node in ray.nodes() if node["Alive"]
        }
    finally:
        ray.shutdown()


def test_unreachable_address_is_one_clear_error() -> None:
    start = time.monotonic()
    with pytest.raises(ProbeError, match=r"cannot reach the Ray cluster at 127\.0\.0\.2:1\b"):
        probe_cluster("127.0.0.2:1")
    assert time.monotonic() - start < 10
    assert not ray.is_initialized()


def test_malformed_address_is_one_clear_error() -> None:
    with pytest.raises(ProbeError, match="cannot connect to the Ray cluster at nohost"):
        probe_cluster("nohost")


def test_probe_command_writes_the_cluster_file_plan_reads(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    out = tmp_path / "cluster.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deployer",
            "probe",
            "--address",
            ray_cluster.address,
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Cluster" in result.stdout
    cluster = parse_cluster(out.read_text())
    assert [node.name for node in cluster.nodes] == list(ray_cluster.node_names)
    assert all(node.cpu_memory_mib for node in cluster.nodes)


def test_probe_command_exits_1_with_one_message_when_ray_is_unreachable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deployer", "probe", "--address", "127.0.0.9:1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "cannot reach the Ray cluster at 127.0.0.9:1" in result.stderr
    assert "Traceback" not in result.stderr
