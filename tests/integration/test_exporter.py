"""The controller's metrics endpoint, served for real on loopback and read back as Prometheus
text: the gauges of the last pass, and a port that cannot be had is one message, exit 1."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployer.planning.reconcile import Observed
from deployer.planning.redeploy import Deployed
from deployer.serving.exporter import LAST_PASS, serve_metrics
from tools.local_ray import free_port

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        family.name: {tuple(sorted(s.labels.items())): s.value for s in family.samples}
        for family in text_string_to_metric_families(text)
    }


def test_the_endpoint_serves_the_last_pass() -> None:
    port = free_port(HOST)
    collector = serve_metrics(port, HOST)
    assert scrape(port) == {}  # no pass yet: nothing to say
    collector.seen(
        Deployed(
            models=[{"model_id": "m"}],
            placements=[
                {"model_id": "m", "node": "n1", "gpus": [1], "gpu_memory_gib": 2.0,
                 "gpu_fraction": 0.25, "gpu_memory_utilization": 0.2}
            ],
            engines={},
        ),
        Observed(alive=frozenset({"n1"}), ingress=True, engines=frozenset({"m"}),
                 serving=frozenset()),
    )  # fmt: skip
    found = scrape(port)
    assert found["rackserve_booked_bytes"] == {
        (("gpu", "1"), ("model", "m"), ("node", "n1")): 2.0 * 1024**3
    }
    assert found["rackserve_model_serving"] == {(("model", "m"),): 0.0}
    assert found[LAST_PASS][()] > 0


def test_a_port_in_use_is_one_message() -> None:
    port = free_port(HOST)
    serve_metrics(port, HOST)
    taken = subprocess.run(
        [sys.executable, "-m", "deployer", "controller", "--address", "127.0.0.1:1",
         "--metrics-port", str(port), "--metrics-address", HOST],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert taken.returncode == 1, taken.stdout + taken.stderr
    assert f"cannot serve metrics on {HOST}:{port}" in taken.stderr
    assert "Traceback" not in taken.stderr
