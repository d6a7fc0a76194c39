"""The roles' settings for rehearsals without GPUs: logical GPUs on workers (ray_worker) and the
stand-in engine with a declared cluster file (deploy_models), rendered with Ansible's own
templating, and the worker's settings check run by ansible-playbook against local hosts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("ansible", reason="ansible-core is not installed")

from deployer.config.api_keys import key_ring
from tests.ansible.test_static import (
    FACTS,
    HERE,
    WORKER_VARS,
    _run,
    _tool,
    evaluate,
    flags,
    render,
    systemd_words,
    unit_entries,
)

pytestmark = pytest.mark.unit


def _worker_argv(settings: dict[str, Any]) -> dict[str, str]:
    unit = render("ray_worker", "ray-worker.service.j2", WORKER_VARS | settings)
    return flags(systemd_words(unit_entries(unit)["ExecStart"][0]))


def test_logical_gpus_start_ray_with_that_many_gpus_and_say_so_in_a_label() -> None:
    found = _worker_argv({"ray_worker_logical_gpus": 4})
    assert found["--num-gpus"] == "4"
    assert found["--labels"] == (
        "rackserve/logical-gpus=4,rackserve/node=gpu-02,rackserve/rack=rack-1,rackserve/role=worker"
    )
    plain = _worker_argv({})
    assert "--num-gpus" not in plain
    assert "logical" not in plain["--labels"]
    assert _worker_argv({"ray_worker_num_gpus": 2})["--num-gpus"] == "2"


def _check_outcomes(tmp_path: Path, hosts: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Run the ray_worker settings check on local hosts: per host `ok` or the failure message."""
    out = tmp_path / "out"
    out.mkdir()
    inventory = {
        "all": {
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                     "check_out_dir": str(out)},
            "children": {"ray_workers": {"hosts": hosts}, "gpu_nodes": {"hosts": {"cpu": {}}}},
        }
    }  # fmt: skip
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory), encoding="utf-8")
    playbook = str(HERE / "playbooks" / "ray_worker_check.yml")
    result = _run(
        [_tool("ansible-playbook"), "-i", str(tmp_path / "hosts.yml"), playbook], tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    outcomes = {}
    for name in hosts:
        done = out / f"{name}.ok"
        error = out / f"{name}.error"
        outcomes[name] = "ok" if done.is_file() else error.read_text(encoding="utf-8")
    return outcomes


def _pci_devices(root: Path, devices: dict[str, tuple[str, str]]) -> Path:
    """A fake /sys/bus/pci/devices: address -> (vendor, class)."""
    for address, (vendor, klass) in devices.items():
        (root / address).mkdir(parents=True)
        (root / address / "vendor").write_text(vendor + "\n")
        (root / address / "class").write_text(klass + "\n")
    return root


def test_logical_gpus_are_refused_on_hosts_with_nvidia_gpus_and_beside_num_gpus(
    tmp_path: Path,
) -> None:
    nvidia = _pci_devices(
        tmp_path / "gpu",
        {"0000:17:00.0": ("0x10de", "0x030200"), "0000:00:1f.0": ("0x8086", "0x060100")},
    )
    nvidia_switch = _pci_devices(tmp_path / "switch", {"0000:05:00.0": ("0x10de", "0x068000")})
    outcomes = _check_outcomes(
        tmp_path,
        {
            "cpu": {"ray_worker_logical_gpus": 4},  # in gpu_nodes, with no NVIDIA GPU
            "switch": {"ray_worker_logical_gpus": 4, "fake_pci_devices_dir": str(nvidia_switch)},
            "off": {"fake_pci_devices_dir": str(nvidia)},
            "real": {"ray_worker_num_gpus": 2},
            "gpu": {"ray_worker_logical_gpus": 4, "fake_pci_devices_dir": str(nvidia)},
            "both": {"ray_worker_logical_gpus": 4, "ray_worker_num_gpus": 2},
            "negative": {"ray_worker_logical_gpus": -1},
        },
    )
    assert {h: outcomes[h] for h in ("cpu", "switch", "off", "real")} == dict.fromkeys(
        ("cpu", "switch", "off", "real"), "ok"
    )
    for host in ("gpu", "both", "negative"):
        assert outcomes[host].startswith(f"{host}: ray_worker_logical_gpus ("), outcomes[host]
        assert "for tests and dry runs" in outcomes[host]
    assert "NVIDIA GPUs (PCI 0000:17:00.0)" in outcomes["gpu"]


ADDRESS_VARS = {"ansible_facts": FACTS, "rackserve_node_ip": "10.20.0.10"}
H100 = {"name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559, "memory_free_mib": 81008}
CLUSTER = {"nodes": [{"name": "gpu-01", "gpus": [{"index": i, **H100} for i in range(4)]}]}


def test_standin_engine_and_cluster_file_reach_rackserve_deploy() -> None:
    argv = evaluate(
        "deploy_models",
        "deploy_models_base_argv",
        ADDRESS_VARS
        | {
            "deploy_models_engine": "standin",
            "deploy_models_cluster": CLUSTER,
            "deploy_models_extra_args": ["--http-port", "8001"],
        },
    )
    assert argv == [
        "/opt/rackserve/venv/bin/rackserve", "deploy", "--models", "/etc/rackserve/models.yaml",
        "--address", "10.20.0.10:6379", "--state-dir", "/var/lib/rackserve/state",
        "--engine", "standin",
        "--cluster", "/etc/rackserve/cluster.yaml", "--http-port", "8001",
    ]  # fmt: skip
    plain = evaluate("deploy_models", "deploy_models_base_argv", ADDRESS_VARS)
    assert "--engine" not in plain
    assert "--cluster" not in plain


def test_cluster_file_is_written_as_the_mapping() -> None:
    text = render("deploy_models", "cluster.yaml.j2", {"deploy_models_cluster": CLUSTER})
    assert yaml.safe_load(text) == CLUSTER


def _paths(cluster_sha1: str | None) -> dict[str, Any]:
    """What the role's stat loop registers: rackserve, models file, Ray session, cluster file."""
    cluster_stat = {"exists": True, "checksum": cluster_sha1} if cluster_sha1 else {"exists": False}
    return {
        "results": [
            {"stat": {"exists": True}},
            {"stat": {"exists": True, "checksum": "m1"}},
            {"stat": {"exists": True, "lnk_target": "session_1"}},
            {"stat": cluster_stat},
        ]
    }


def test_the_record_of_a_deployment_names_engine_and_cluster_only_when_set() -> None:
    """A record written before these settings existed still matches a plain vLLM deployment;
    switching the engine or changing the cluster file makes the next run deploy."""
    plain = evaluate("deploy_models", "deploy_models_stamp", ADDRESS_VARS | {
        "deploy_models_paths": _paths(None)})  # fmt: skip
    assert plain == {"models_sha1": "m1", "ray_session": "session_1",
                     "ray_address": "10.20.0.10:6379", "extra_args": []}  # fmt: skip
    rehearsal = ADDRESS_VARS | {"deploy_models_engine": "standin", "deploy_models_cluster": CLUSTER}
    first = evaluate("deploy_models", "deploy_models_stamp", rehearsal | {
        "deploy_models_paths": _paths("c1")})  # fmt: skip
    assert first == plain | {"engine": "standin", "cluster_sha1": "c1"}
    changed = evaluate("deploy_models", "deploy_models_stamp", rehearsal | {
        "deploy_models_paths": _paths("c2")})  # fmt: skip
    assert changed != first


KEYS = [
    {"name": "team-a", "key": "rsk-" + "a" * 43, "models": ["one", "two"]},
    {"name": "ops", "key": "rsk-" + "b" * 43, "models": ["*"]},
]


def test_the_key_file_holds_the_digests_rackserve_checks_and_never_a_key() -> None:
    """Ansible's hash('sha256') and rackserve's digest agree: the endpoint finds each vault key."""
    text = render("deploy_models", "api-keys.json.j2", {"deploy_models_api_keys": KEYS})
    ring = key_ring(json.loads(text), "rendered key file")
    for entry in KEYS:
        found = ring.find(entry["key"])
        assert found is not None, entry["name"]
        assert (found.name, list(found.models)) == (entry["name"], entry["models"])
        assert entry["key"] not in text
    assert ring.find("rsk-" + "c" * 43) is None


def test_keys_and_tls_reach_rackserve_deploy() -> None:
    argv = evaluate(
        "deploy_models",
        "deploy_models_base_argv",
        ADDRESS_VARS
        | {
            "deploy_models_api_keys": KEYS,
            "deploy_models_tls_certfile": "files/endpoint.crt",
            "deploy_models_tls_keyfile": "files/endpoint.key",
        },
    )
    assert argv[argv.index("--api-keys") + 1] == "/etc/rackserve/api-keys.json"
    assert argv[argv.index("--ssl-certfile") + 1] == "/etc/rackserve/tls/endpoint.crt"
    assert argv[argv.index("--ssl-keyfile") + 1] == "/etc/rackserve/tls/endpoint.key"
    assert not any(k["key"] in " ".join(argv) for k in KEYS)
    open_argv = evaluate(
        "deploy_models", "deploy_models_base_argv", ADDRESS_VARS | {"deploy_models_no_auth": True}
    )
    assert "--no-auth" in open_argv
    plain = evaluate("deploy_models", "deploy_models_base_argv", ADDRESS_VARS)
    assert not {"--api-keys", "--no-auth", "--ssl-certfile"} & set(plain)
