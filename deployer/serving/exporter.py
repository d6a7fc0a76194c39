"""The controller's Prometheus endpoint: the plan's gauges (`deployer.planning.plan_metrics`).

`rackserve controller --metrics-port PORT` serves them with prometheus_client's own HTTP
server, computed at each scrape from what the last controller pass saw. A scrape never
contacts Ray: a controller that cannot reach the cluster keeps serving its last view, and
`rackserve_controller_last_pass_seconds` says how old it is.

prometheus_client (which vLLM, CUDA or CPU build, requires) is imported at the top:
only the `controller` command imports this module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily

from deployer.planning.plan_metrics import FAMILIES, plan_samples
from deployer.planning.reconcile import Observed
from deployer.planning.redeploy import Deployed

LAST_PASS = "rackserve_controller_last_pass_seconds"


class PlanCollector:
    """A prometheus_client collector over the last pass's record and observation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: tuple[Deployed | None, Observed] | None = None
        self._at = 0.0

    def seen(self, deployed: Deployed | None, observed: Observed) -> None:
        """Keep what a controller pass observed (`run_controller`'s `seen`)."""
        with self._lock:
            self._seen, self._at = (deployed, observed), time.time()

    def collect(self) -> Iterator[Any]:
        """The gauges, for prometheus_client's registry."""
        with self._lock:
            seen, at = self._seen, self._at
        if seen is None:
            return
        deployed, observed = seen
        families: dict[str, Any] = {}
        for sample in plan_samples(deployed, observed.serving, observed.alive, observed.addresses):
            family = families.get(sample.name)
            if family is None:
                labels = list(sample.labels)
                family = GaugeMetricFamily(sample.name, FAMILIES[sample.name], labels=labels)
                families[sample.name] = family
            family.add_metric(list(sample.labels.values()), sample.value)
        yield from families.values()
        yield GaugeMetricFamily(LAST_PASS, "When the controller last observed the cluster.", at)


def serve_metrics(port: int, address: str = "") -> PlanCollector:
    """Start the HTTP endpoint (a daemon thread) and return the collector to feed."""
    collector = PlanCollector()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    start_http_server(port, addr=address, registry=registry)
    return collector
