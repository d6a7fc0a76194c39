"""Plans translated into Ray Serve LLM configurations: pins, fractions, env, memory, order."""

from __future__ import annotations

import json

import pytest

from deployer.config.cluster import Cluster, Gpu, Node
from deployer.config.models_config import ModelManager, parse_models_config
from deployer.config.units import GIB
from deployer.errors import ConfigError
from deployer.planning.placement import Demand, plan_placements
from deployer.planning.serve_config import (
    CPU_ENGINE_CLASS,
    ENGINE_CLASS_ENV,
    NODE_LABEL,
    engine_specs,
    route_prefix,
    waves,
)

pytestmark = pytest.mark.unit


def h100_node(name: str, gpus: int, labelled: bool = True) -> Node:
    return Node(
        name=name,
        gpus=[
            Gpu(
                index=i,
                name="NVIDIA H100 80GB HBM3",
                memory_total_mib=81_559,
                memory_free_mib=81_000,
            )
            for i in range(gpus)
        ],
        ray_node_id=f"{name}-id",
        labels={NODE_LABEL: name} if labelled else {},
    )


MODELS = """
models:
  - {model_id: big, tensor_parallel_size: 2, gpu_memory_gib: 60, max_model_len: 8192}
  - {model_id: a, gpu_memory_gib: 30, max_num_seqs: 8, engine_kwargs: {enable_prefix_caching: true}}
  - {model_id: b, gpu_memory_gib: 20}
  - {model_id: c, gpu_memory_gib: 20, quantization: fp8}
"""


def plan_for(models: ModelManager, cluster: Cluster):  # type: ignore[no-untyped-def]
    demands = [
        Demand(
            m.model_id, m.tensor_parallel_size, round((m.gpu_memory_gib or 0) * GIB), node=m.node
        )
        for m in models
    ]
    return plan_placements(cluster, demands)


def test_gpu_plan_becomes_pinned_fractional_configs_in_launch_order() -> None:
    models = parse_models_config(MODELS)
    cluster = Cluster(nodes=[h100_node("gpu-a", 2), h100_node("gpu-b", 1, labelled=False)])
    plan = plan_for(models, cluster)
    specs = engine_specs(plan, models, cluster)
    assert [s.model_id for s in specs] == [p.model_id for p in plan.placements]
    by_id = {s.model_id: s for s in specs}
    placement = {p.model_id: p for p in plan.placements}

    big = by_id["big"].llm_config
    assert by_id["big"].node == "gpu-a"
    assert big["placement_group_config"] == {
        "bundles": [{"GPU": 1.0}, {"GPU": 1.0}],
        "strategy": "STRICT_PACK",
    }
    assert (
        big["deployment_config"]["placement_group_bundle_label_selector"]
        == [{NODE_LABEL: "gpu-a"}] * 2
    )
    assert big["runtime_env"]["env_vars"] == {
        "VLLM_RAY_PER_WORKER_GPUS": "1.0",
        "VLLM_CONFIGURE_LOGGING": "0",  # else a head restart replaces it (REPLICA_ENV)
    }
    assert big["engine_kwargs"]["tensor_parallel_size"] == 2
    assert big["engine_kwargs"]["max_model_len"] == 8192
    assert big["engine_kwargs"]["gpu_memory_utilization"] == placement["big"].gpu_memory_utilization

    for model_id in ("a", "b", "c"):
        config = by_id[model_id].llm_config
        fraction = placement[model_id].gpu_fraction
        assert fraction is not None
        assert 0 < fraction < 1
        assert config["placement_group_config"]["bundles"] == [{"GPU": fraction}]
        assert config["runtime_env"]["env_vars"]["VLLM_RAY_PER_WORKER_GPUS"] == str(fraction)
        assert (
            config["engine_kwargs"]["gpu_memory_utilization"]
            == placement[model_id].gpu_memory_utilization
        )
        assert config["model_loading_config"] == {"model_id": model_id, "model_source": model_id}
    # gpu-b has no rackserve label: pinned by Ray node id instead
    on_b = [s for s in specs if s.node == "gpu-b"]
    assert on_b
    for spec in on_b:
        assert spec.llm_config["deployment_config"]["placement_group_bundle_label_selector"] == [
            {"ray.io/node-id": "gpu-b-id"}
        ]
    assert by_id["a"].llm_config["engine_kwargs"]["enable_prefix_caching"] is True
    assert by_id["a"].llm_config["engine_kwargs"]["max_num_seqs"] == 8
    assert by_id["c"].llm_config["engine_kwargs"]["quantization"] == "fp8"


def test_engines_on_one_node_start_in_successive_waves() -> None:
    models = parse_models_config(MODELS)
    cluster = Cluster(nodes=[h100_node("gpu-a", 2), h100_node("gpu-b", 1)])
    specs = engine_specs(plan_for(models, cluster), models, cluster)
    grouped = waves(specs)
    for wave in grouped:
        nodes = [s.node for s in wave]
        assert len(nodes) == len(set(nodes)), "two engines of one node in one wave"
    # flattening the waves keeps each node's plan order
    for node in {s.node for s in specs}:
        planned = [s.model_id for s in specs if s.node == node]
        started = [s.model_id for wave in grouped for s in wave if s.node == node]
        assert started == planned


def test_cpu_plan_has_cpu_bundles_kv_bytes_and_no_gpu_keys() -> None:
    models = parse_models_config(
        "models: [{model_id: t1, gpu_memory_gib: 2}, {model_id: t2, gpu_memory_gib: 2}]"
    )
    cluster = Cluster(
        nodes=[
            Node(name="n1", cpu_memory_mib=4096, labels={NODE_LABEL: "n1"}),
            Node(name="n2", cpu_memory_mib=4096, labels={NODE_LABEL: "n2"}),
        ]
    )
    demands = [Demand(m.model_id, 1, 2 * GIB, kv_cache_bytes=GIB // 4) for m in models]
    specs = engine_specs(plan_placements(cluster, demands), models, cluster)
    assert {s.node for s in specs} == {"n1", "n2"}
    for spec in specs:
        config = spec.llm_config
        assert config["accelerator_config"] == {"kind": "cpu"}
        assert config["placement_group_config"]["bundles"] == [{"CPU": 1.0}]
        assert config["engine_kwargs"]["kv_cache_memory_bytes"] == GIB // 4
        assert config["deployment_config"]["ray_actor_options"] == {"num_cpus": 0}
        text = json.dumps(config)
        assert "GPU" not in text
        assert "gpu_memory_utilization" not in text
        assert "accelerator_type" not in text
        assert config["runtime_env"]["env_vars"][ENGINE_CLASS_ENV] == CPU_ENGINE_CLASS


@pytest.mark.parametrize(
    ("backend", "engine_class"), [(None, CPU_ENGINE_CLASS), ("uni", CPU_ENGINE_CLASS), ("mp", None)]
)
def test_cpu_engines_run_the_model_in_the_engine_core_unless_a_model_asks_for_mp(
    backend: str | None, engine_class: str | None
) -> None:
    asked = {} if backend is None else {"distributed_executor_backend": backend}
    models = parse_models_config(json.dumps({"models": [
        {"model_id": "t", "gpu_memory_gib": 2, "engine_kwargs": asked}
    ]}))  # fmt: skip
    cpu = Cluster(nodes=[Node(name="n", cpu_memory_mib=4096, labels={NODE_LABEL: "n"})])
    demands = [Demand("t", 1, 2 * GIB, kv_cache_bytes=GIB // 4)]
    (spec,) = engine_specs(plan_placements(cpu, demands), models, cpu)
    assert spec.llm_config["runtime_env"]["env_vars"].get(ENGINE_CLASS_ENV) == engine_class
    gpu = Cluster(nodes=[h100_node("g", 1)])
    (on_gpu,) = engine_specs(plan_for(models, gpu), models, gpu)
    assert ENGINE_CLASS_ENV not in on_gpu.llm_config["runtime_env"]["env_vars"]


def test_unpinnable_node_is_bad_input() -> None:
    models = parse_models_config("models: [{model_id: a, gpu_memory_gib: 2}]")
    cluster = Cluster(
        nodes=[Node(name="n", gpus=[Gpu(index=0, memory_total_mib=81_559, memory_free_mib=81_000)])]
    )
    with pytest.raises(ConfigError, match="neither a 'rackserve/node' label nor a Ray node id"):
        engine_specs(plan_for(models, cluster), models, cluster)


def test_route_prefix_is_shared_by_all_models() -> None:
    models = parse_models_config("models: [{model_id: a, route_prefix: /x}, {model_id: b}]")
    assert route_prefix(models.list()) == "/x"
    assert route_prefix(parse_models_config("models: [{model_id: a}]").list()) == "/"
    # One setting of the application: differing values are refused when the file is parsed.
    with pytest.raises(ConfigError, match="route_prefix: the models ask for different values"):
        parse_models_config(
            "models: [{model_id: a, route_prefix: /x}, {model_id: b, route_prefix: /y}]"
        )


def test_staged_and_shared_weights_load_offline_from_the_node() -> None:
    models = parse_models_config(
        """
models:
  - {model_id: org/s, model_source: /srv/ckpt/s, weights: staged, gpu_memory_gib: 10}
  - {model_id: t, model_source: /nfs/t, weights: shared, gpu_memory_gib: 10}
  - {model_id: u, model_source: /srv/u, weights: staged, store_dir: /nvme/m/, gpu_memory_gib: 10}
  - {model_id: hub, model_source: org/hub, gpu_memory_gib: 10}
  - {model_id: org/m, weights: staged, revision: v1.0, gpu_memory_gib: 10}
"""
    )
    from_hub = {m.model_id: m.stages_from_hub for m in models}
    assert from_hub == {"org/s": False, "t": False, "u": False, "hub": False, "org/m": True}
    cluster = Cluster(nodes=[h100_node("gpu-a", 4)])
    configs = {
        s.model_id: s.llm_config for s in engine_specs(plan_for(models, cluster), models, cluster)
    }
    sources = {m: c["model_loading_config"]["model_source"] for m, c in configs.items()}
    assert sources == {
        "org/s": "/var/lib/rackserve/models/org--s",
        "t": "/nfs/t",
        "u": "/nvme/m/u",
        "hub": "org/hub",
        "org/m": "/var/lib/rackserve/models/org--m",
    }
    offline = {m: c["runtime_env"]["env_vars"].get("HF_HUB_OFFLINE") for m, c in configs.items()}
    assert offline == {"org/s": "1", "t": "1", "u": "1", "hub": None, "org/m": "1"}


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("{model_id: a, model_source: /x, revision: v1}", "revision is the hub revision"),
        ("{model_id: a, weights: shared}", "weights: shared needs model_source"),
        ("{model_id: a, model_source: rel/dir, weights: shared}", "needs an absolute model_source"),
        (
            "{model_id: a, model_source: /x, store_dir: models}",
            "store_dir must be an absolute path",
        ),
        ("{model_id: a/../b, model_source: /x, weights: staged}", "cannot name a store directory"),
        ("{model_id: .a, model_source: /x, weights: staged}", "starts with '.'"),
        ("{model_id: a, weights: copied}", "weights"),
    ],
)
def test_weights_settings_that_cannot_work_are_bad_input(model: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_models_config(f"models: [{model}]")
    assert problem in str(caught.value)
