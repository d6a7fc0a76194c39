"""The planning pipeline: models config → memory estimates → placement plan.

Each model's files are read once (the only I/O, through `read_files`, swappable in tests);
every problem with every model is gathered into one ConfigError before anything is planned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from deployer.checkpoint import read_model_files
from deployer.cluster import GIB, Cluster
from deployer.errors import ConfigError, shown
from deployer.estimate import (
    CUDA_CONTEXT_GIB,
    CheckpointSize,
    EstimateError,
    MemoryEstimate,
    estimate_memory,
)
from deployer.models_config import ModelConfig, ModelManager
from deployer.placement import DEFAULT_RESERVE_GIB, Demand, Plan, plan_placements

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


def demand_of(
    model: ModelConfig, estimate: MemoryEstimate, gpus: tuple[int, ...] | None = None
) -> Demand:
    """What the planner needs to know of one estimated model (`gpus`: where it runs and stays)."""
    context = round(CUDA_CONTEXT_GIB * GIB)
    overhead = estimate.overhead_bytes_per_gpu
    return Demand(
        model_id=model.model_id,
        tensor_parallel_size=model.tensor_parallel_size,
        bytes_per_gpu=estimate.total_bytes_per_gpu,
        node=model.node,
        accelerator_type=model.accelerator_type,
        bytes_per_gpu_by_tp=estimate.total_bytes_per_gpu_by_tp,
        kv_cache_bytes=estimate.kv_cache_bytes_per_gpu,
        outside_budget_bytes=min(context, context if overhead is None else overhead),
        gpus=gpus,
    )


def plan_models(
    cluster: Cluster,
    models: ModelManager,
    estimates: Sequence[MemoryEstimate],
    reserve_gib: float = DEFAULT_RESERVE_GIB,
    kept_gpus: Mapping[str, tuple[int, ...]] | None = None,
) -> Plan:
    """Plan the estimated models onto the cluster; `kept_gpus`: engines that stay where they run."""
    kept = kept_gpus or {}
    demands = [
        demand_of(m, e, kept.get(m.model_id)) for m, e in zip(models, estimates, strict=True)
    ]
    return plan_placements(cluster, demands, reserve_gib=reserve_gib)
