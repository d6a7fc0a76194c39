"""From a plan to Ray Serve LLM configurations: pure translation, no Ray imported.

Each placed model becomes the keyword arguments of one `ray.serve.llm.LLMConfig`
(docs/ray-and-vllm-facts.md says why each key is there):

- pinned to its planned node with `deployment_config.placement_group_bundle_label_selector`
  (the node's `rackserve/node` label, else its `ray.io/node-id`), one selector per bundle;
- GPU: one bundle per rank with the plan's Ray GPU fraction, `VLLM_RAY_PER_WORKER_GPUS` set to
  that fraction in the runtime env (Ray 2.60 does not pass it on), and the plan's
  `gpu_memory_utilization` in the engine kwargs;
- CPU: the CPU accelerator config, a CPU bundle, `kv_cache_memory_bytes` from the plan, no GPU
  key anywhere, and rackserve's CPU engine class (`deployer.serving.cpu_engine`).

Engines are started in waves: wave k holds the k-th placement of every node in plan order, so
that Ray's first-fit reproduces the plan and two engines never start on one GPU at once.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from deployer.config.cluster import NODE_LABEL, Cluster, Node
from deployer.config.models_config import ModelConfig, ModelManager
from deployer.errors import ConfigError
from deployer.planning.placement import Placement, Plan

APP_NAME = "rackserve"
"""The Ray Serve application that holds every model."""
DEFAULT_HTTP_HOST = "0.0.0.0"
"""Where the OpenAI endpoint listens by default (Serve's HTTP proxy; every interface)."""
DEFAULT_HTTP_PORT = 8000
"""The OpenAI endpoint's default port (Serve's)."""
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
"""Addresses every node holds: with one of them, every node's proxy serves the endpoint."""


def proxy_location(http_host: str) -> str:
    """Where Serve runs HTTP proxies: on every node for a wildcard address, else on the head.

    With proxies on every node, each node's port serves the whole endpoint and keeps serving
    its own models while the head is away. A specific address is held by one node only (the
    head's, by convention), so a proxy elsewhere could not bind it.
    """
    return "EveryNode" if http_host in WILDCARD_HOSTS else "HeadOnly"


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """One model's launch description: where, in which wave, and its LLMConfig arguments."""

    model_id: str
    node: str
    wave: int
    llm_config: Mapping[str, Any]


def node_selector(node: Node) -> dict[str, str]:
    """The Ray label selector that matches exactly this node."""
    if NODE_LABEL in node.labels:
        return {NODE_LABEL: node.labels[NODE_LABEL]}
    if node.ray_node_id:
        return {"ray.io/node-id": node.ray_node_id}
    raise ConfigError(
        f"node {node.name!r} has neither a {NODE_LABEL!r} label nor a Ray node id, so models "
        "cannot be pinned to it; deploy against a probed cluster"
    )


def engine_kwargs(model: ModelConfig, placement: Placement) -> dict[str, Any]:
    """Engine arguments for vLLM: the model's settings, the plan's memory, its engine_kwargs."""
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": model.tensor_parallel_size,
        "dtype": model.dtype,
        "kv_cache_dtype": model.kv_cache_dtype,
    }
    for name in ("max_model_len", "max_num_seqs", "quantization"):
        value = getattr(model, name)
        if value is not None:
            kwargs[name] = value
    if placement.device == "gpu":
        kwargs["gpu_memory_utilization"] = placement.gpu_memory_utilization
    elif placement.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = placement.kv_cache_memory_bytes
    kwargs.update(model.engine_kwargs)
    return kwargs


REPLICA_ENV = {"VLLM_CONFIGURE_LOGGING": "0"}
"""Set in every replica rackserve runs (engines and the ingress).

vLLM's logging setup (`logging.config.dictConfig`, on import) closes every handler already
made, Serve's replica log handler among them; a Serve controller recovering after a head
restart then fails its check of each surviving replica and replaces it (Ray 2.60). With vLLM's
setup off, vLLM's records go through Ray's worker logging (warnings and errors; no INFO).
"""


ENGINE_CLASS_ENV = "RAYLLM_VLLM_ENGINE_CLS"
"""The environment variable naming the engine class Serve LLM builds in an engine's replica."""
CPU_ENGINE_CLASS = "deployer.serving.cpu_engine.CpuEngine"
"""The engine of CPU placements: vLLM's model run in the engine core process, not in a spinning
worker process beside it (`deployer.serving.cpu_engine` says why). A model whose engine_kwargs
set `distributed_executor_backend: mp` keeps Serve LLM's own engine and executor."""


def llm_config(model: ModelConfig, placement: Placement, node: Node) -> dict[str, Any]:
    """The keyword arguments of `ray.serve.llm.LLMConfig` for one placed model."""
    if placement.device == "gpu":
        fraction = placement.gpu_fraction
        assert fraction is not None
        bundles: list[dict[str, float]] = [
            {"GPU": fraction} for _ in range(model.tensor_parallel_size)
        ]
        env = {"VLLM_RAY_PER_WORKER_GPUS": str(fraction)}
        accelerator: dict[str, Any] = {}
        actor_options: dict[str, Any] = {}
    else:
        bundles = [{"CPU": 1.0}]
        env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
        if model.engine_kwargs.get("distributed_executor_backend", "uni") == "uni":
            env[ENGINE_CLASS_ENV] = CPU_ENGINE_CLASS
        accelerator = {"accelerator_config": {"kind": "cpu"}}
        actor_options = {"num_cpus": 0}  # the replica lives in the bundle's CPU
    if model.weights != "engine":
        env["HF_HUB_OFFLINE"] = "1"  # staged or shared: the weights are on the node already
    selector = node_selector(node)
    return {
        "model_loading_config": {"model_id": model.model_id, "model_source": model.served_source},
        "engine_kwargs": engine_kwargs(model, placement),
        **accelerator,
        "placement_group_config": {"bundles": bundles, "strategy": "STRICT_PACK"},
        "deployment_config": {
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
            "placement_group_bundle_label_selector": [dict(selector) for _ in bundles],
            "ray_actor_options": actor_options,
        },
        "runtime_env": {"env_vars": {**REPLICA_ENV, **env}},
    }


def route_prefix(models: Sequence[ModelConfig]) -> str:
    """The application's route prefix: the one the models give, else '/'.

    All models are served by one application, so they cannot ask for different prefixes.
    """
    prefixes = sorted({m.route_prefix for m in models if m.route_prefix is not None})
    if len(prefixes) > 1:
        raise ConfigError(
            f"models ask for different route_prefix values {prefixes}; rackserve serves every "
            "model from one application: give them one route_prefix, or none"
        )
    return prefixes[0] if prefixes else "/"


def engine_specs(plan: Plan, models: ModelManager, cluster: Cluster) -> list[EngineSpec]:
    """One spec per placement, in plan (launch) order, with its start wave."""
    nodes = {node.name: node for node in cluster.nodes}
    position: dict[str, int] = defaultdict(int)
    specs = []
    for placement in plan.placements:
        wave = position[placement.node]
        position[placement.node] += 1
        model = models.get(placement.model_id)
        specs.append(
            EngineSpec(
                model_id=model.model_id,
                node=placement.node,
                wave=wave,
                llm_config=llm_config(model, placement, nodes[placement.node]),
            )
        )
    return specs


def waves(specs: Sequence[EngineSpec]) -> list[list[EngineSpec]]:
    """The specs grouped by start wave, in order."""
    grouped: dict[int, list[EngineSpec]] = defaultdict(list)
    for spec in specs:
        grouped[spec.wave].append(spec)
    return [grouped[w] for w in sorted(grouped)]
