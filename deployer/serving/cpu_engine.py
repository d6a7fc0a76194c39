"""The vLLM engine rackserve runs on CPU nodes: Serve LLM's, with the model run in the engine core.

On CPU, Ray Serve LLM (2.60) always hands vLLM the `mp` executor, which runs the model in a
worker process of its own. The engine core and that worker then wait for each other on a
shared-memory queue by spinning (`sched_yield` in a loop, for a second after each message): two
processes busy for one engine's work, 11 to 21% of a core at rest and most of two cores under
load on the development machine, CPU that Serve's proxy, ingress and engine replica then have to
take from the model's own step. An engine of one rank needs no worker process: vLLM's `uni`
executor runs the model in the engine core, which sleeps on its input queue when idle.

`CpuEngine` is Serve LLM's `VLLMEngine` with that one change, made after vLLM has built and
checked its configuration (its CPU platform would turn `uni` back into `mp`, for OpenMP thread
binding, which rackserve turns off on CPU: `VLLM_CPU_OMP_THREADS_BIND=nobind`). Serve LLM
builds it in the engine's replica when `RAYLLM_VLLM_ENGINE_CLS` names it
(`deployer.planning.serve_config` sets that for CPU placements); docs/7-benchmarks.md has the
figures.

This module imports Ray and vLLM at the top: only Serve LLM's engine replica imports it.
"""

from __future__ import annotations

from typing import Any

from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

IN_PROCESS_EXECUTOR = "uni"
"""vLLM's executor that runs the model in the engine core process."""


class CpuEngine(VLLMEngine):
    """Serve LLM's vLLM engine, with a one-rank engine's model run in the engine core process."""

    def _start_async_llm_engine(
        self, vllm_engine_args: Any, vllm_engine_config: Any, placement_group: Any
    ) -> Any:
        parallel = vllm_engine_config.parallel_config
        if parallel.world_size == 1:
            parallel.distributed_executor_backend = IN_PROCESS_EXECUTOR
        return super()._start_async_llm_engine(
            vllm_engine_args, vllm_engine_config, placement_group
        )
