"""The stand-in engine (`rackserve deploy --engine standin`): a dry run that serves nothing.

For rehearsals and dry runs only, on logical GPUs (`ray start --num-gpus N`) or before vLLM is
installed. `deployer.serving.applications` builds the engine's deployment exactly as for vLLM
(name, placement group bundles and strategy, bundle label selectors, actor options, runtime
env, autoscaling) and swaps the class: `StandInEngine` runs instead of Ray Serve LLM's
`LLMServer`. It gets the same `LLMConfig` as a dict (`model_dump()`): unpickling an `LLMConfig`
imports vLLM and torch, which took the replica 30 to 60 s here instead of 10 to 20.

The replica does for GPUs what vLLM 0.29's Ray executor (`RayExecutorV2`, its default) does:
one worker actor per GPU bundle of the replica's placement group, in bundle order, up to
tensor_parallel_size, each with `num_cpus=0`, `num_gpus=VLLM_RAY_PER_WORKER_GPUS`, a
`PlacementGroupSchedulingStrategy` on its bundle, and the replica's runtime env plus
`RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1` (vLLM picks the GPU from `ray.get_gpu_ids()`,
so Ray leaves `CUDA_VISIBLE_DEVICES` unset). Every rank then reports what Ray gave it
(`report()`); a worker Ray cannot place fails the replica, as it would fail vLLM.

Requests through the OpenAI ingress get an OpenAI-shaped error saying this is a stand-in; the
ingress itself (`/v1/models`) works as with vLLM. Ray is imported inside the functions only.
The first request to a replica waits for vLLM's import (the ingress sends vLLM's request
classes; about 10 s on two cores), which `LLMServer` pays while it starts: the stand-in skips
it, since most rehearsals send no request and a start costs 10 s of CPU per engine.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

from deployer.config.cluster import NODE_LABEL

WORKER_START_TIMEOUT_S = 120.0
NOSET_CUDA_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
PER_WORKER_GPUS = "VLLM_RAY_PER_WORKER_GPUS"
STANDIN_STATUS = 501


@dataclasses.dataclass(frozen=True)
class RankReport:
    """What one tensor-parallel rank's worker saw."""

    rank: int
    bundle_index: int
    node: str | None
    """The worker's node's `rackserve/node` label."""
    gpu_ids: tuple[int, ...]
    """`ray.get_gpu_ids()`: the GPUs Ray assigned to the worker."""
    cuda_visible_devices: str | None
    vllm_ray_per_worker_gpus: str | None


@dataclasses.dataclass(frozen=True)
class EngineReport:
    """What one stand-in engine was given and where its ranks ran."""

    model_id: str
    replica: str
    """The replica's Ray actor id: another one after a restart."""
    node: str | None
    """The replica's node's `rackserve/node` label."""
    tensor_parallel_size: int
    gpu_memory_utilization: float | None
    vllm_ray_per_worker_gpus: str | None
    """The replica's own environment (the runtime env rackserve set)."""
    ranks: tuple[RankReport, ...]

    @property
    def gpus(self) -> tuple[int, ...]:
        """The GPUs of all ranks, rank by rank."""
        return tuple(gpu for rank in self.ranks for gpu in rank.gpu_ids)


class _RankWorker:
    """The stand-in for vLLM's `RayWorkerProc`: it only reports what Ray gave it."""

    def __init__(self, rank: int, bundle_index: int) -> None:
        self._rank = rank
        self._bundle_index = bundle_index

    def report(self) -> RankReport:
        import ray

        return RankReport(
            rank=self._rank,
            bundle_index=self._bundle_index,
            node=node_label(),
            gpu_ids=tuple(int(str(gpu)) for gpu in ray.get_gpu_ids()),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            vllm_ray_per_worker_gpus=os.environ.get(PER_WORKER_GPUS),
        )


def node_label() -> str | None:
    """The `rackserve/node` label of the node this process runs on."""
    import ray

    value: Any = ray.get_runtime_context().get_node_labels().get(NODE_LABEL)
    if isinstance(value, list):  # typed as a list of values; Ray 2.60 returns the string
        value = value[0] if value else None
    return None if value is None else str(value)


class StandInEngine:
    """Ray Serve replica in place of `LLMServer`: starts one worker per rank, serves nothing."""

    def __init__(self, llm_config: Mapping[str, Any]) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._llm_config = llm_config
        kwargs: Mapping[str, Any] = llm_config.get("engine_kwargs") or {}
        tensor_parallel_size = int(kwargs.get("tensor_parallel_size", 1))
        context = ray.get_runtime_context()
        group = ray.util.get_current_placement_group()
        if group is None:
            raise RuntimeError("the stand-in replica runs outside a placement group")
        gpu_bundles = [i for i, bundle in enumerate(group.bundle_specs) if bundle.get("GPU")]
        runtime_env = dict(context.runtime_env or {})
        runtime_env["env_vars"] = {
            **runtime_env.get("env_vars", {}),
            NOSET_CUDA_VISIBLE_DEVICES: "1",
        }
        per_worker = float(os.environ.get(PER_WORKER_GPUS, "1.0"))
        worker_class: Any = ray.remote(_RankWorker)
        self._workers = [
            worker_class.options(
                num_cpus=0,
                num_gpus=per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=bundle
                ),
                runtime_env=runtime_env,
            ).remote(rank, bundle)
            for rank, bundle in enumerate(gpu_bundles[:tensor_parallel_size])
        ]
        try:
            ranks = ray.get(
                [worker.report.remote() for worker in self._workers],
                timeout=WORKER_START_TIMEOUT_S,
            )
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"Ray did not place the stand-in's {len(self._workers)} worker(s) of "
                f"{per_worker} GPU each in the bundles {gpu_bundles} within "
                f"{WORKER_START_TIMEOUT_S:.0f} s: the bundles do not hold what the workers ask"
            ) from None
        utilization = kwargs.get("gpu_memory_utilization")
        self._report = EngineReport(
            model_id=str(llm_config["model_loading_config"]["model_id"]),
            replica=str(context.get_actor_id()),
            node=node_label(),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=None if utilization is None else float(utilization),
            vllm_ray_per_worker_gpus=os.environ.get(PER_WORKER_GPUS),
            ranks=tuple(ranks),
        )

    def report(self) -> EngineReport:
        """Where the engine's ranks run and what it was given."""
        return self._report

    async def llm_config(self) -> Mapping[str, Any]:
        """The LLMConfig it was deployed with, as a dict (`LLMServer.llm_config` returns it)."""
        return self._llm_config

    async def check_health(self) -> None:
        """Healthy while its replica lives (its workers hold the GPUs)."""

    async def chat(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        """Refuse: a stand-in serves nothing."""
        yield _refusal(self._report.model_id)

    async def completions(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        """Refuse: a stand-in serves nothing."""
        yield _refusal(self._report.model_id)

    async def embeddings(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        """Refuse: a stand-in serves nothing."""
        yield _refusal(self._report.model_id)

    async def transcriptions(
        self, request: Any, raw_request_info: Any = None
    ) -> AsyncIterator[Any]:
        """Refuse: a stand-in serves nothing."""
        yield _refusal(self._report.model_id)

    async def score(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        """Refuse: a stand-in serves nothing."""
        yield _refusal(self._report.model_id)

    async def tokenize(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        """Refuse: a stand-in serves nothing."""
        yield _refusal(self._report.model_id)

    async def detokenize(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        """Refuse: a stand-in serves nothing."""
        yield _refusal(self._report.model_id)


def _refusal(model_id: str) -> Any:
    """The OpenAI-shaped error the ingress turns into an HTTP error for the client."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse

    return ErrorResponse(
        error=ErrorInfo(
            message=(
                f"model {model_id!r} runs on rackserve's stand-in engine (a dry run of the "
                "launch), which serves no requests; deploy with --engine vllm to serve it"
            ),
            type="NotImplementedError",
            code=STANDIN_STATUS,
        )
    )
