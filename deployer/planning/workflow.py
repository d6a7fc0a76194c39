"""Estimated models → placement plan: what the planner is asked for each model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from deployer.config.cluster import Cluster
from deployer.config.models_config import ModelConfig, ModelManager
from deployer.config.units import GIB
from deployer.planning.estimate import CUDA_CONTEXT_GIB, MemoryEstimate
from deployer.planning.placement import DEFAULT_RESERVE_GIB, Demand, Plan, plan_placements


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
    holders: Sequence[Demand] = (),
) -> Plan:
    """Plan the estimated models onto the cluster; `kept_gpus`: engines that stay where they run.

    `holders`: engines that hold their place while the plan's engines start (a make-before-break
    move's old engines); they are planned first, in place, and are part of the plan returned.
    """
    kept = kept_gpus or {}
    demands = [
        demand_of(m, e, kept.get(m.model_id)) for m, e in zip(models, estimates, strict=True)
    ]
    return plan_placements(cluster, [*holders, *demands], reserve_gib=reserve_gib)
