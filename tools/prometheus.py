"""A real Prometheus (the distribution's package) for tests: started, queried, stopped by PID.

It scrapes what it is given every second through a `file_sd` list, the way the monitoring role
points Prometheus at the list of metrics endpoints Ray writes. Nothing here is in the wheel.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tools.local_ray import free_port

SCRAPE_INTERVAL_S = 1

_METRICS_TARGETS = (
    "import json, sys, ray\n"
    "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
    "print(json.dumps(sorted(f\"{n['NodeManagerAddress']}:{n['MetricsExportPort']}\"\n"
    "                        for n in ray.nodes() if n['Alive'])))\n"
)


def ray_metrics_targets(address: str) -> list[str]:
    """Every alive Ray node's metrics endpoint (`host:port`), from `ray.nodes()` in a child."""
    out = subprocess.run(
        [sys.executable, "-c", _METRICS_TARGETS, address],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    targets: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return targets


@dataclass(frozen=True)
class Prometheus:
    """A running Prometheus: its HTTP API."""

    url: str

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query's result vector (`metric` labels and `value`)."""
        query = urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{query}", timeout=30) as response:
            answer = json.loads(response.read())
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def values(self, expression: str, label: str) -> dict[str, float]:
        """The query's values by one label."""
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expression)}

    def names(self) -> set[str]:
        """Every series name Prometheus has stored."""
        with urllib.request.urlopen(f"{self.url}/api/v1/label/__name__/values", timeout=30) as r:
            return set(json.loads(r.read())["data"])

    def error(self, expression: str) -> str | None:
        """Prometheus's error for a query it refuses (a 400), None for one it runs."""
        try:
            self.query(expression)
        except urllib.error.HTTPError as refused:
            return str(json.loads(refused.read()).get("error", refused))
        return None

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, with `health` and `labels`."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=30) as response:
            found: list[dict[str, Any]] = json.loads(response.read())["data"]["activeTargets"]
        return found


@contextlib.contextmanager
def start_prometheus(
    base: Path,
    jobs: Mapping[str, Sequence[str]],
    host: str = "127.0.0.1",
    rules: Path | None = None,
    rules_for: str | None = None,
) -> Iterator[Prometheus]:
    """Prometheus scraping each job's targets (a file_sd list per job) every second.

    Listens on `host` (loopback); its data lives under `base`; stopped by PID on exit. With
    `rules`, it evaluates that rule file every second, each alert's `for` set to `rules_for`
    when given (the shipped durations, minutes, are unit-tested by `promtool test rules`).
    """
    binary = shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus is not installed (the distribution's package)")
    base.mkdir(parents=True, exist_ok=True)
    scrape_configs = []
    for job, targets in jobs.items():
        listed = base / f"{job}.json"
        listed.write_text(json.dumps([{"targets": list(targets)}]))
        scrape_configs.append({"job_name": job, "file_sd_configs": [{"files": [str(listed)]}]})
    settings: dict[str, Any] = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
        },
        "scrape_configs": scrape_configs,
    }
    if rules is not None:
        document = yaml.safe_load(rules.read_text())
        for group in document["groups"]:
            for rule in group["rules"]:
                if rules_for is not None and "alert" in rule:
                    rule["for"] = rules_for
        (base / "rules.yml").write_text(yaml.safe_dump(document))
        settings["rule_files"] = [str(base / "rules.yml")]
    config = base / "prometheus.yml"
    config.write_text(yaml.safe_dump(settings))
    port = free_port(host)
    log = (base / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={base / 'data'}",
            f"--web.listen-address={host}:{port}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prometheus = Prometheus(f"http://{host}:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"prometheus did not start: {(base / 'prometheus.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.3)
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


RANGES = {"__rate_interval": "1m", "interval": "1m", "window": "1m", "__interval": "1m"}
"""Grafana's range variables, as a query over the last minute would fill them in."""
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_EQUALS_ALL = re.compile(r'(\w+)="\.\*"')
_METRIC = re.compile(r"\b(ray_[A-Za-z0-9_:]+|rackserve_[A-Za-z0-9_:]+)")


def panel_queries(dashboard: Mapping[str, Any], values: Mapping[str, str]) -> dict[str, str]:
    """Every panel target's query of a Grafana dashboard JSON, by `panel / legend [value]`.

    Variables are filled in as Grafana would: `values` (one at a time, for a dashboard whose
    rows repeat per value of `$model`), the range variables, and every other variable as "all"
    (`.*`, with `=` made `=~`). Panels nested in rows are included.
    """
    queries: dict[str, str] = {}
    panels = list(dashboard.get("panels", []))
    for row in dashboard.get("rows", []):  # the older layout some generated dashboards keep
        panels.extend(row.get("panels", []))
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr:
                continue
            for key, value in values.items() if "$model" in expr else [("", "")]:

                def fill(match: re.Match[str], value: str = value) -> str:
                    name = match.group(1) or match.group(2)
                    if name == "model":
                        return value
                    return RANGES.get(name, "10m" if name == "__range" else ".*")

                query = _EQUALS_ALL.sub(r'\1=~".*"', _VARIABLE.sub(fill, expr))
                name = f"{panel.get('title', '?')} / {target.get('legendFormat', '')} {key}"
                queries[name.strip()] = query
    return queries


def metric_names(query: str) -> set[str]:
    """The Ray and rackserve series a query reads."""
    return set(_METRIC.findall(query))
