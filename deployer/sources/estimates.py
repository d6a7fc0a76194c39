"""Models config → memory estimates: each model's files read once, every problem gathered.

The only I/O of planning is here, through `read_files` (swappable in tests); every problem with
every model is gathered into one ConfigError before anything is planned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deployer.config.models_config import ModelManager
from deployer.errors import ConfigError, shown
from deployer.planning.estimate import (
    CheckpointSize,
    EstimateError,
    MemoryEstimate,
    estimate_memory,
)
from deployer.sources.checkpoint import read_model_files

FileReader = Callable[[str], tuple[dict[str, Any], CheckpointSize | None]]


def estimate_models(
    models: ModelManager, read_files: FileReader = read_model_files
) -> list[MemoryEstimate]:
    """Estimate every model; all failures are reported together, each naming its model."""
    estimates: list[MemoryEstimate] = []
    problems: list[str] = []
    for index, model in enumerate(models):
        try:
            if model.gpu_memory_gib is not None:
                estimates.append(estimate_memory(model, None))
            else:
                config, checkpoint = read_files(model.source)
                estimates.append(estimate_memory(model, config, checkpoint))
        except EstimateError as exc:
            problems.append(f"models[{index}] (id {shown(model.model_id)}): {exc}")
    if problems:
        raise ConfigError(problems, source="models config")
    return estimates
