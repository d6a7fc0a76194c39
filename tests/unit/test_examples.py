"""The examples run as written, and the models reference lists every field."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deployer.config.models_config import ModelConfig

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def rackserve(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"MODELS_CONFIG", "MODEL_ID"}}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "deployer", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


def test_readme_plan_example_runs_and_places_every_model() -> None:
    result = rackserve(
        "plan",
        "--cluster",
        "examples/cluster.yaml",
        "--models",
        "examples/models.yaml",
        "--json",
        "-",
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["summary"]["models_placed"] == 7
    by_id = {p["model_id"]: p for p in plan["placements"]}
    assert by_id["qwen2.5-7b"]["node"] == "gpu-03"  # pinned
    assert by_id["qwen3-30b-a3b"]["node"] in {"gpu-01", "gpu-02"}  # H100 only
    assert all(p["node"] != "head" for p in plan["placements"])  # CPU node unused


def test_readme_estimate_example_runs() -> None:
    result = rackserve("estimate", "--models", "examples/models.yaml", "--json", "-")
    assert result.returncode == 0, result.stderr
    rows = {row["model_id"]: row for row in json.loads(result.stdout)}
    assert rows["llama-3.1-70b"]["kv_cache_gib_per_gpu"] == 20.0


def test_models_reference_documents_every_model_field() -> None:
    reference = ROOT / "docs" / "3-models-configuration.md"
    text = reference.read_text()
    header = "| field | type | default | meaning |"
    assert header in text, f"{reference.name} has no models configuration table"
    table = text[text.index(header) :].split("\n\n")[0]
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.MULTILINE))
    missing = [name for name in ModelConfig.model_fields if name not in rows]
    assert not missing, f"{reference.name}'s models configuration table lacks {missing}"
    unknown = sorted(rows - set(ModelConfig.model_fields))
    assert not unknown, f"{reference.name}'s models configuration table lists {unknown}"


def test_example_model_configs_are_real_files_matching_the_test_data() -> None:
    # The examples ship on their own (no links into tests/), and stay what the tests check.
    for config in sorted((ROOT / "examples" / "models").glob("*/config.json")):
        assert not config.is_symlink(), config
        twin = ROOT / "tests" / "data" / "hf_configs" / f"{config.parent.name}.json"
        assert json.loads(config.read_text()) == json.loads(twin.read_text()), config
