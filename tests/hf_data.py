"""The published config.json files under tests/data/hf_configs, and facts about them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HF_CONFIGS = Path(__file__).parent / "data" / "hf_configs"


def hf_config(repo_id: str) -> dict[str, Any]:
    """The published config.json of a model, e.g. 'meta-llama/Llama-3.1-8B-Instruct'."""
    return json.loads((HF_CONFIGS / (repo_id.replace("/", "--") + ".json")).read_text())


def hf_facts() -> dict[str, dict[str, Any]]:
    """Published facts about those models (see tests/data/hf_configs/FACTS.md)."""
    facts: dict[str, dict[str, Any]] = json.loads((HF_CONFIGS / "facts.json").read_text())
    return facts
