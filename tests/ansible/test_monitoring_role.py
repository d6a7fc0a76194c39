"""The monitoring role without hosts: its Prometheus configuration, rendered with Ansible's own
templating for the sample inventory, is one that the real `promtool` accepts, and scrapes
what the rack runs; its firewall list holds each host's monitoring ports."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ansible.test_static import REPO, evaluate, render

pytestmark = pytest.mark.unit

SAMPLE = yaml.safe_load((REPO / "inventory" / "sample" / "hosts.yml").read_text(encoding="utf-8"))


def _inventory(extra_groups: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """`groups` and `hostvars` of the sample inventory (and extra groups), with facts."""
    children = SAMPLE["all"]["children"]
    groups = {name: list(group["hosts"]) for name, group in children.items()}
    groups.update(extra_groups or {})
    hostvars: dict[str, Any] = {}
    for group in children.values():
        for host, values in group["hosts"].items():
            hostvars.setdefault(host, {"ansible_facts": {"default_ipv4": {"address": "192.0.2.9"}}})
            hostvars[host].update(values or {})
    for host in (extra_groups or {}).get("monitoring", []):
        hostvars.setdefault(host, {"ansible_facts": {"default_ipv4": {"address": "10.20.0.99"}}})
    return {"groups": groups, "hostvars": hostvars}


def _variables(host: str, extra_groups: dict[str, list[str]] | None = None) -> dict[str, Any]:
    inventory = _inventory(extra_groups)
    return {**inventory, **inventory["hostvars"][host], "inventory_hostname": host}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("RACKSERVE_PROMETHEUS_REQUIRED") == "1":
            pytest.fail("promtool is missing: install the distribution's prometheus package")
        pytest.skip("promtool is missing (the distribution's prometheus package)")
    return found


def _checked(config: str, tmp_path: Path) -> dict[str, Any]:
    """The configuration, after `promtool check config` accepted it (rules file included)."""
    path = tmp_path / "prometheus.yml"
    parsed: dict[str, Any] = yaml.safe_load(config)
    # The rules file is where the role copies it; point the check at the repository's copy.
    parsed["rule_files"] = [str(REPO / "roles" / "monitoring" / "files" / "rackserve-rules.yml")]
    path.write_text(yaml.safe_dump(parsed))
    checked = subprocess.run(
        [_promtool(), "check", "config", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return parsed


def _targets(config: dict[str, Any]) -> dict[str, Any]:
    jobs: dict[str, Any] = {}
    for job in config["scrape_configs"]:
        if "file_sd_configs" in job:
            jobs[job["job_name"]] = job["file_sd_configs"][0]["files"]
        else:
            jobs[job["job_name"]] = job["static_configs"][0]["targets"]
    return jobs


def test_prometheus_on_the_head_reads_rays_list_and_scrapes_every_host(tmp_path: Path) -> None:
    config = _checked(render("monitoring", "prometheus.yml.j2", _variables("head-01")), tmp_path)
    assert _targets(config) == {
        "prometheus": ["10.20.0.10:9090"],
        "ray": ["/var/lib/rackserve/ray/prom_metrics_service_discovery.json"],
        "node": [f"10.20.0.{n}:9100" for n in (10, 11, 12, 13)],
        "rackserve": ["10.20.0.10:9750"],
    }
    assert config["global"] == {"scrape_interval": "15s", "evaluation_interval": "15s"}


def test_prometheus_elsewhere_scrapes_the_inventorys_ray_nodes_and_dcgm(tmp_path: Path) -> None:
    variables = _variables("mon-01", {"monitoring": ["mon-01"]}) | {
        "monitoring_dcgm_targets": ["10.20.0.11:9400"],
        "monitoring_rackserve_exporter_port": 0,
    }
    config = _checked(render("monitoring", "prometheus.yml.j2", variables), tmp_path)
    assert _targets(config) == {
        "prometheus": ["10.20.0.99:9090"],
        "ray": [f"10.20.0.{n}:8080" for n in (10, 11, 12, 13)],
        "node": [*(f"10.20.0.{n}:9100" for n in (10, 11, 12, 13)), "10.20.0.99:9100"],
        "dcgm": ["10.20.0.11:9400"],
    }


@pytest.mark.parametrize(
    ("host", "groups", "ports"),
    [
        ("head-01", None, ["9100", "9090", "9750"]),
        ("gpu-01", None, ["9100"]),
        ("head-01", {"monitoring": ["mon-01"]}, ["9100", "9750"]),
        ("mon-01", {"monitoring": ["mon-01"]}, ["9100", "9090"]),
    ],
)
def test_each_host_firewalls_its_own_monitoring_ports(
    host: str, groups: dict[str, list[str]] | None, ports: list[str]
) -> None:
    assert evaluate("monitoring", "monitoring_tcp_ports", _variables(host, groups)) == ports


def test_settings_put_prometheus_on_the_cluster_ip_with_its_retention() -> None:
    variables = _variables("head-01") | {"monitoring_prometheus_retention": "30d"}
    settings = render("monitoring", "prometheus.default.j2", variables)
    assert (
        'ARGS="--web.listen-address=10.20.0.10:9090 --storage.tsdb.retention.time=30d"' in settings
    )
    exporter = render("monitoring", "node-exporter.default.j2", _variables("gpu-02"))
    assert 'ARGS="--web.listen-address=10.20.0.12:9100"' in exporter
