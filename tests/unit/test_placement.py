"""The placement planner: rules, Ray's view of fractions, reasons, CPU clusters."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployer.config.cluster import Cluster, Gpu, Node
from deployer.config.units import GIB, MIB
from deployer.errors import ConfigError
from deployer.planning.packing import CAPACITY
from deployer.planning.placement import Demand, Plan, plan_placements, ray_assigns_bundle

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
    """Ray 2.60's choice for each placement when bundles are created in plan order.

    The raylet's rule (`NodeResourceInstanceSet::TryAllocate`): whole GPUs take the lowest free
    indices; a fraction takes the GPU with the least room left after it (best fit), the lowest
    index on a tie. Written apart from the planner's own replay, in floats.
    """
    remaining: dict[tuple[str, int], float] = {
        (node.name, gpu.index): 1.0 for node in cluster.nodes for gpu in node.gpus
    }
    chosen = {}
    for p in plan.placements:
        indices = sorted(i for (n, i) in remaining if n == p.node)
        assert p.gpu_fraction is not None
        if p.tensor_parallel_size > 1 or p.gpu_fraction == 1.0:
            free = [i for i in indices if remaining[(p.node, i)] == 1.0][: p.tensor_parallel_size]
            for i in free:
                remaining[(p.node, i)] = 0.0
            chosen[p.model_id] = tuple(free)
        else:
            fits = [i for i in indices if remaining[(p.node, i)] >= p.gpu_fraction - 1e-9]
            best = min(fits, key=lambda i: (round(remaining[(p.node, i)] - p.gpu_fraction, 6), i))
            remaining[(p.node, best)] -= p.gpu_fraction
            chosen[p.model_id] = (best,)
    return chosen


def check_plan(plan: Plan, cluster: Cluster, demands: list[Demand], reserve_gib: float) -> None:
    by_id = {d.model_id: d for d in demands}
    placed = {p.model_id for p in plan.placements}
    unplaced = {u.model_id for u in plan.unplaced}
    assert not placed & unplaced
    assert placed | unplaced == set(by_id), "every model placed or reported"
    booked: dict[tuple[str, int], int] = defaultdict(int)
    utilization: dict[tuple[str, int], float] = defaultdict(float)
    fractions: dict[tuple[str, int], float] = defaultdict(float)
    for p in plan.placements:
        d = by_id[p.model_id]
        node = cluster.node(p.node)
        assert node is not None
        assert len(p.gpus) == len(set(p.gpus)) == d.tensor_parallel_size, "distinct GPUs, one node"
        if d.node:
            assert p.node == d.node
        assert p.gpu_memory_utilization is not None
        assert p.gpu_fraction is not None
        for index in p.gpus:
            booked[(p.node, index)] += d.bytes_per_gpu
            utilization[(p.node, index)] += p.gpu_memory_utilization
            fractions[(p.node, index)] += p.gpu_fraction
        assert 0 < p.gpu_memory_utilization <= 1
    for node in cluster.nodes:
        for gpu in node.gpus:
            usable = gpu.memory_free_mib * MIB - reserve_gib * GIB
            assert booked[(node.name, gpu.index)] <= usable, "GPU over its usable memory"
            # What vLLM is told: the engines sharing a GPU never claim more than it can give.
            share = utilization[(node.name, gpu.index)] * gpu.memory_total_mib * MIB
            assert share <= usable + 1e-6, "gpu_memory_utilization over the GPU's usable memory"
            assert fractions[(node.name, gpu.index)] <= 1.0 + 1e-9, "GPU booked past 1.0"
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


def test_ray_assigns_fractions_best_fit_and_whole_gpus_lowest_first() -> None:
    # Measured on Ray 2.60 with 4 logical GPUs: 0.5, 0.7, 0.3 land on GPUs 0, 1, 1.
    room = [CAPACITY] * 4
    got = [ray_assigns_bundle(room, round(f * CAPACITY)) for f in (0.5, 0.7, 0.3)]
    assert got == [(0,), (1,), (1,)]
    assert ray_assigns_bundle(room, CAPACITY) == (2,), "a whole GPU: the lowest wholly free"
    assert ray_assigns_bundle(room, 2 * CAPACITY) is None, "only GPU 3 is wholly free"
    assert room == [5_000, 0, 0, CAPACITY], "a refused bundle takes nothing"
    assert ray_assigns_bundle(room, 5_000) == (0,), "exact fit beats a fresh GPU"
    assert ray_assigns_bundle([4_000, 6_000, 4_000], 3_000) == (0,), "lowest index on a tie"


def test_plan_reports_the_gpus_ray_picks_not_first_fit() -> None:
    # The measured case: 4 GPUs of 80 GiB, reserve 0. First-fit put m3 (3.5 GiB) on GPU 0 in
    # the plan while Ray, best fit, put it beside m4 and m1 on GPU 2: three engines whose
    # gpu_memory_utilization summed past the GPU.
    cluster = Cluster(nodes=[gpu_node("n", 4, free=81_920, total=81_920)])
    sizes = [54.8, 33.0, 41.5, 3.5, 38.8, 37.2]
    demands = [demand(f"m{i}", gib) for i, gib in enumerate(sizes)]
    plan = plan_placements(cluster, demands, reserve_gib=0)
    by_id = {p.model_id: p for p in plan.placements}
    assert by_id["m3"].gpus == (2,)
    assert {m for m, p in by_id.items() if p.gpus == (2,)} == {"m1", "m3", "m4"}
    check_plan(plan, cluster, demands, 0.0)


def test_engines_that_keep_running_keep_their_gpus() -> None:
    cluster = Cluster(nodes=[gpu_node("n", 4, free=81_920, total=81_920)])
    first = plan_placements(cluster, [demand("a", 30), demand("b", 30)], reserve_gib=0)
    where = {p.model_id: p.gpus for p in first.placements}
    kept = [demand(m, 30, node="n", gpus=where[m]) for m in ("a", "b")]
    again = plan_placements(cluster, [demand("big", 70, tp=2), *kept], reserve_gib=0)
    by_id = {p.model_id: p for p in again.placements}
    assert by_id["a"].gpus == where["a"]
    assert by_id["b"].gpus == where["b"]
    assert not set(by_id["big"].gpus) & {*where["a"], *where["b"]}
    # Launch order: the running engines hold their bundles before any new one is created.
    assert [p.model_id for p in again.placements][:2] == ["a", "b"]


def test_no_gpu_left_beside_kept_engines_is_reported_not_overbooked() -> None:
    # Kept engines on GPUs 0 and 2 of a 3-GPU node: the packing puts both on one GPU and a
    # tensor-parallel pair on the other two, but Ray has only GPU 1 wholly free.
    cluster = Cluster(nodes=[gpu_node("n", 3, free=81_920, total=81_920)])
    kept = [demand(m, 20, node="n", gpus=(k,)) for m, k in (("a", 0), ("b", 2))]
    plan = plan_placements(cluster, [*kept, demand("pair", 50, tp=2)], reserve_gib=0)
    assert [(p.model_id, p.gpus) for p in plan.placements] == [("a", (0,)), ("b", (2,))]
    (why,) = plan.unplaced
    assert why.model_id == "pair"
    assert "rackserve down" in why.reason
