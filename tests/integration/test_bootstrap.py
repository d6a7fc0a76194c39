"""`rackserve bootstrap` runs the real playbooks through ansible-runner (here on localhost).

The preflight play is the first thing site.yml does; fed a broken inventory it must stop the run
before any change, and bootstrap must name the host and the task. Converging real hosts is
tested on the rack-in-a-box (tests/rack).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from deployer.bootstrap.runner import parse_extravars, run_playbook
from deployer.errors import ConfigError

pytestmark = pytest.mark.integration

pytest.importorskip("ansible_runner", reason="ansible-runner is not installed ('.[bootstrap]')")

TWO_HEADS = """
all:
  hosts:
    node-a: {ansible_connection: local, ansible_python_interpreter: "%(python)s"}
    node-b: {ansible_connection: local, ansible_python_interpreter: "%(python)s"}
  children:
    ray_head: {hosts: {node-a: {}, node-b: {}}}
    ray_workers: {hosts: {}}
    gpu_nodes: {hosts: {}}
"""


@pytest.fixture
def two_heads(tmp_path: Path) -> Path:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(TWO_HEADS % {"python": sys.executable})
    return inventory


def test_preflight_failure_names_host_and_task_and_stops_the_run(two_heads: Path) -> None:
    console = Console(record=True, width=200)
    result = run_playbook(two_heads, "site", console=console)
    assert not result.ok
    (failure,) = result.failures
    assert failure.task == "Inventory | Check the Ray groups"
    assert "exactly one host in ray_head (found 2: node-a, node-b)" in failure.message
    output = console.export_text()
    assert "PLAY Preflight" in output
    assert "NVIDIA driver" not in output, "nothing after preflight may run"
    assert result.stats[failure.host]["failures"] == 1


def test_cli_exits_1_on_a_failed_run_and_2_on_bad_input(two_heads: Path, tmp_path: Path) -> None:
    failed = subprocess.run(
        [sys.executable, "-m", "deployer", "bootstrap", "-i", str(two_heads)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 1
    assert "task 'Inventory | Check the Ray groups'" in failed.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "deployer", "bootstrap", "-i", str(tmp_path / "nope.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2
    assert "inventory" in missing.stderr
    assert "is not a file" in missing.stderr


def test_extra_vars_are_typed_and_files_are_read(tmp_path: Path) -> None:
    extra = tmp_path / "vars.yml"
    extra.write_text("deploy_models_enabled: false\nray_head_port: 6380\n")
    assert parse_extravars(["a=1", "b=true", "c=x y", f"@{extra}"]) == {
        "a": 1,
        "b": True,
        "c": "x y",
        "deploy_models_enabled": False,
        "ray_head_port": 6380,
    }
    with pytest.raises(ConfigError, match="expected KEY=VALUE or @FILE"):
        parse_extravars(["novalue"])
