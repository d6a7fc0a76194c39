"""Readings of vLLM's per-model series for `rackserve top`.

From Prometheus when one is given, else from every Ray node's metrics endpoint directly.

Both give `Sample`s of the series `deployer.planning.model_load` needs (`SERIES`); that module
does the arithmetic. Ray's endpoints are found through `ray.nodes()` (`MetricsExportPort`),
parsed with prometheus_client's parser (which Ray and vLLM require; only `top` imports this
module).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from deployer.errors import RackserveError
from deployer.planning.model_load import SERIES
from deployer.planning.plan_metrics import Sample
from deployer.serving.probe import connect

READ_TIMEOUT_S = 10.0

Reader = Callable[[], list[Sample]]


def metrics_endpoints(address: str) -> list[str]:
    """Every alive Ray node's metrics URL."""
    import ray

    connect(address)
    try:
        nodes: list[dict[str, object]] = ray.nodes()  # type: ignore[no-untyped-call]
    finally:
        ray.shutdown()
    return sorted(
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in nodes
        if node.get("Alive")
    )


def endpoint_reader(endpoints: list[str]) -> Reader:
    """Reads the series from each endpoint; a node that does not answer is left out."""

    def read() -> list[Sample]:
        samples = []
        for url in endpoints:
            try:
                with urllib.request.urlopen(url, timeout=READ_TIMEOUT_S) as response:
                    text = response.read().decode()
            except OSError:
                continue  # a node going away: its engines are not serving either
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in SERIES:
                        samples.append(Sample(sample.name, dict(sample.labels), sample.value))
        return samples

    return read


def prometheus_reader(url: str) -> Reader:
    """Reads the series' current values from the Prometheus at `url` (an instant query)."""
    names = "|".join(SERIES)
    query = urllib.parse.urlencode({"query": f'{{__name__=~"{names}"}}'})
    address = f"{url.rstrip('/')}/api/v1/query?{query}"

    def read() -> list[Sample]:
        try:
            with urllib.request.urlopen(address, timeout=READ_TIMEOUT_S) as response:
                answer = json.loads(response.read())
        except (OSError, ValueError) as exc:
            raise RackserveError(
                f"cannot query Prometheus at {url}: {exc}; check --prometheus (its base URL, "
                "e.g. http://HEAD:9090) or leave it out to read Ray's metrics endpoints"
            ) from None
        return [
            Sample(
                result["metric"]["__name__"],
                {k: v for k, v in result["metric"].items() if k != "__name__"},
                float(result["value"][1]),
            )
            for result in answer["data"]["result"]
        ]

    return read
