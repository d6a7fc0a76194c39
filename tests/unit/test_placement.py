"""The placement planner: rules, Ray's view of fractions, reasons, CPU clusters."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployer.cluster import GIB, MIB, Cluster, Gpu, Node
from deployer.errors import ConfigError
from deployer.placement import Demand, Plan, plan_placements

pytestmark = pytest.mark.unit

H100_TOTAL = 81_559  # MiB, as NVML reports an H100 80GB


def gpu_node(
    name: str,
    gpus: int,
    free: int = 81_000,
    total: int = H100_TOTAL,
    kind: str = "NVIDIA H100 80GB HBM3",
) -> Node:
    return Node(
        name=name,
        gpus=[
            Gpu(index=i, name=kind, memory_total_mib=total, memory_free_mib=free)
            for i in range(gpus)
        ],
    )


def demand(model_id: str, gib: float, tp: int = 1, **extra: object) -> Demand:
    return Demand(
        model_id=model_id, tensor_parallel_size=tp, bytes_per_gpu=round(gib * GIB), **extra
    )  # type: ignore[arg-type]


def simulate_ray(plan: Plan, cluster: Cluster) -> dict[str, tuple[int, ...]]:
    """Ray's choice for each placement when bundles are created in plan order.

    Whole GPUs: the lowest free GPU indices. Fractions: the first GPU (by index) whose remaining
    share is at least the fraction.
    """
    remaining: dict[tuple[str, int], float] = {
        (node.name, gpu.index): 1.0 for node in cluster.nodes for gpu in node.gpus
    }
    chosen = {}
    for p in plan.placements:
        indices = sorted(i for (n, i) in remaining if n == p.node)
        assert p.gpu_fraction is not None
        if p.tensor_parallel_size > 1:
            free = [i for i in indices if remaining[(p.node, i)] == 1.0][: p.tensor_parallel_size]
            for i in free:
                remaining[(p.node, i)] = 0.0
            chosen[p.model_id] = tuple(free)
        else:
            first = next(i for i in indices if remaining[(p.node, i)] >= p.gpu_fraction - 1e-12)
            remaining[(p.node, first)] -= p.gpu_fraction
            chosen[p.model_id] = (first,)
    return chosen


def check_plan(plan: Plan, cluster: Cluster, demands: list[Demand], reserve_gib: float) -> None:
    by_id = {d.model_id: d for d in demands}
    placed = {p.model_id for p in plan.placements}
    unplaced = {u.model_id for u in plan.unplaced}
    assert not placed & unplaced
    assert placed | unplaced == set(by_id), "every model placed or reported"
    booked: dict[tuple[str, int], int] = defaultdict(int)
    for p in plan.placements:
        d = by_id[p.model_id]
        node = cluster.node(p.node)
        assert node is not None
        assert len(p.gpus) == len(set(p.gpus)) == d.tensor_parallel_size, "distinct GPUs, one node"
        if d.node:
            assert p.node == d.node
        for index in p.gpus:
            booked[(p.node, index)] += d.bytes_per_gpu
        assert p.gpu_memory_utilization is not None
        assert 0 < p.gpu_memory_utilization <= 1
    for node in cluster.nodes:
        for gpu in node.gpus:
            usable = gpu.memory_free_mib * MIB - reserve_gib * GIB
            assert booked[(node.name, gpu.index)] <= usable, "GPU over its usable memory"
    # Ray, given the bundles in plan order, picks exactly the planned GPUs.
    assert simulate_ray(plan, cluster) == {p.model_id: p.gpus for p in plan.placements}


def test_tensor_parallel_ranks_take_whole_gpus_of_one_node() -> None:
    cluster = Cluster(nodes=[gpu_node("a", 2), gpu_node("b", 4)])
    demands = [demand("big", 60, tp=4), demand("small", 10)]
    plan = plan_placements(cluster, demands)
    by_id = {p.model_id: p for p in plan.placements}
    assert by_id["big"].node == "b"
    assert by_id["big"].gpu_fraction == 1.0
    assert len(by_id["big"].gpus) == 4
    check_plan(plan, cluster, demands, 1.0)


def test_small_models_share_a_gpu_with_fractions_that_fit() -> None:
    cluster = Cluster(nodes=[gpu_node("a", 2)])
    demands = [demand("m1", 30), demand("m2", 30), demand("m3", 15)]
    plan = plan_placements(cluster, demands)
    assert plan.gpus_used == 1
    fractions = [p.gpu_fraction for p in plan.placements]
    assert all(f is not None for f in fractions)
    assert sum(f for f in fractions if f is not None) <= 1.0
    # each fraction covers its footprint relative to the GPU's total memory
    for p in plan.placements:
        assert p.gpu_fraction is not None
        assert p.gpu_fraction * H100_TOTAL * MIB >= p.gpu_memory_bytes
    check_plan(plan, cluster, demands, 1.0)


def test_gpu_memory_utilization_is_a_share_of_total_memory_with_leftover_as_kv() -> None:
    cluster = Cluster(nodes=[gpu_node("a", 1)])
    demands = [
        demand("m1", 30, outside_budget_bytes=GIB // 2),
        demand("m2", 10, outside_budget_bytes=GIB // 2),
    ]
    plan = plan_placements(cluster, demands, reserve_gib=2.0)
    usable = 81_000 * MIB - 2 * GIB
    leftover = usable - 40 * GIB
    by_id = {p.model_id: p for p in plan.placements}
    assert by_id["m1"].extra_kv_bytes == leftover * 3 // 4
    assert by_id["m2"].extra_kv_bytes == leftover // 4
    # together the engines ask vLLM for no more than the usable memory, CUDA contexts aside
    asked = sum(p.gpu_memory_utilization or 0 for p in plan.placements) * H100_TOTAL * MIB
    assert asked + 2 * (GIB // 2) <= usable
    assert asked + 2 * (GIB // 2) >= usable - 2 * H100_TOTAL * MIB / 10_000


def test_reserve_zero_uses_all_free_memory() -> None:
    cluster = Cluster(nodes=[gpu_node("a", 1, free=40 * 1024)])
    assert not plan_placements(cluster, [demand("m", 40)], reserve_gib=0).unplaced
    assert plan_placements(cluster, [demand("m", 40)], reserve_gib=0.5).unplaced


def test_too_big_suggests_a_tensor_parallel_size_that_fits() -> None:
    cluster = Cluster(nodes=[gpu_node("a", 8)])
    d = demand("llama-70b", 96, bytes_per_gpu_by_tp={1: 96 * GIB, 2: 50 * GIB, 4: 27 * GIB})
    plan = plan_placements(cluster, [d])
    (why,) = plan.unplaced
    assert "needs 96.0 GiB per GPU at tensor_parallel_size 1" in why.reason
    assert "78.1 GiB usable" in why.reason
    assert why.reason.endswith("try tensor_parallel_size 2")


def test_too_wide_and_wrong_accelerator_are_explained() -> None:
    cluster = Cluster(nodes=[gpu_node("a", 4)])
    plan = plan_placements(
        cluster, [demand("wide", 10, tp=8), demand("a100-only", 10, accelerator_type="A100")]
    )
    reasons = {u.model_id: u.reason for u in plan.unplaced}
    assert "needs 8 GPUs on one node" in reasons["wide"]
    assert "has 4" in reasons["wide"]
    assert "accelerator_type 'A100' matches no GPU" in reasons["a100-only"]
    assert "NVIDIA H100 80GB HBM3" in reasons["a100-only"]


def test_accelerator_type_selects_matching_nodes() -> None:
    cluster = Cluster(
        nodes=[
            gpu_node("h", 1),
            gpu_node("a", 1, kind="NVIDIA A100-SXM4-80GB", free=80_000, total=81_920),
        ]
    )
    plan = plan_placements(cluster, [demand("m", 10, accelerator_type="A100")])
    assert plan.placements[0].node == "a"


def test_pins_are_honoured_and_unknown_nodes_are_bad_input() -> None:
    cluster = Cluster(nodes=[gpu_node("a", 2), gpu_node("b", 2)])
    plan = plan_placements(cluster, [demand("m1", 10, node="b"), demand("m2", 10, node="b")])
    assert {p.node for p in plan.placements} == {"b"}
    with pytest.raises(ConfigError, match=r"node 'c' is not in the cluster \(nodes: a, b\)"):
        plan_placements(cluster, [demand("m1", 10, node="c")])


def test_no_room_left_is_explained_and_exit_code_worthy() -> None:
    cluster = Cluster(nodes=[gpu_node("a", 1)])
    plan = plan_placements(cluster, [demand("m1", 50), demand("m2", 50)])
    assert len(plan.placements) == 1
    (why,) = plan.unplaced
    assert why.reason.startswith("no room left for 50.0 GiB on a GPU")


def test_heterogeneous_free_memory_packs_against_the_tightest_gpu() -> None:
    # GPU 1 has only 30 GiB free; Ray cannot tell the GPUs apart, so two 25 GiB models
    # must not be planned as if GPU 0's 78 GiB were available to a fraction.
    cluster = Cluster(
        nodes=[
            Node(
                name="a",
                gpus=[
                    Gpu(index=0, memory_total_mib=H100_TOTAL, memory_free_mib=81_000),
                    Gpu(index=1, memory_total_mib=H100_TOTAL, memory_free_mib=31 * 1024),
                ],
            )
        ]
    )
    demands = [demand("m1", 25), demand("m2", 25)]
    plan = plan_placements(cluster, demands)
    assert plan.gpus_used == 2
    check_plan(plan, cluster, demands, 1.0)


def test_cpu_cluster_places_on_cpu_nodes_with_kv_cache_bytes() -> None:
    cluster = Cluster(
        nodes=[Node(name="n1", cpu_memory_mib=8 * 1024), Node(name="n2", cpu_memory_mib=8 * 1024)]
    )
    demands = [
        demand("a", 4, kv_cache_bytes=GIB),
        demand("b", 4, kv_cache_bytes=2 * GIB),
        demand("c", 5, tp=2),
    ]
    plan = plan_placements(cluster, demands)
    assert plan.device == "cpu"
    by_id = {p.model_id: p for p in plan.placements}
    assert by_id["a"].node != by_id["b"].node  # 4 + 4 GiB exceeds 7 GiB usable per node
    assert by_id["a"].kv_cache_memory_bytes == GIB
    assert by_id["a"].gpu_fraction is None
    assert by_id["a"].gpus == ()
    (why,) = plan.unplaced
    assert why.model_id == "c"
    assert "CPU nodes serve tensor_parallel_size 1" in why.reason
    document = plan.as_json()
    assert "gpu_fraction" in document["placements"][0]
    assert document["summary"] == {
        "models_placed": 2,
        "models_unplaced": 1,
        "gpus_used": 2,
        "nodes_used": 2,
        "device": "cpu",
        "proven_optimal": True,
    }


def test_cpu_nodes_are_ignored_when_the_cluster_has_gpus() -> None:
    cluster = Cluster(nodes=[Node(name="head", cpu_memory_mib=64 * 1024), gpu_node("g", 1)])
    plan = plan_placements(cluster, [demand("m", 10)])
    assert plan.placements[0].node == "g"


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Cluster, list[Demand], float]:
    nodes = []
    for n in range(draw(st.integers(1, 3))):
        count = draw(st.integers(1, 4))
        nodes.append(
            Node(
                name=f"n{n}",
                gpus=[
                    Gpu(
                        index=i,
                        memory_total_mib=H100_TOTAL,
                        memory_free_mib=draw(st.integers(20_000, 81_000)),
                    )
                    for i in range(count)
                ],
            )
        )
    demands = [
        demand(
            f"m{i}",
            draw(st.floats(0.5, 80)),
            tp=draw(st.sampled_from([1, 1, 1, 2, 4])),
            node=draw(st.sampled_from([None, None, None, "n0"])),
        )
        for i in range(draw(st.integers(1, 10)))
    ]
    return Cluster(nodes=nodes), demands, draw(st.sampled_from([0.0, 1.0, 4.0]))


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_plans_respect_every_rule(scenario: tuple[Cluster, list[Demand], float]) -> None:
    cluster, demands, reserve = scenario
    plan = plan_placements(cluster, demands, reserve_gib=reserve)
    check_plan(plan, cluster, demands, reserve)
    assert plan == plan_placements(cluster, demands, reserve_gib=reserve), "deterministic"
