"""The plan's gauges: booked memory per model, node and GPU, desired against serving."""

from __future__ import annotations

from deployer.config.units import GIB
from deployer.planning.plan_metrics import FAMILIES, plan_samples
from deployer.planning.redeploy import Deployed


def placement(model_id: str, node: str, gpus: list[int], gib: float) -> dict[str, object]:
    return {
        "model_id": model_id,
        "node": node,
        "device": "gpu",
        "gpus": gpus,
        "gpu_memory_gib": gib,
        "gpu_fraction": 0.5,
        "gpu_memory_utilization": 0.45,
    }


DEPLOYED = Deployed(
    models=[{"model_id": "big"}, {"model_id": "small"}, {"model_id": "left-out"}],
    placements=[placement("big", "gpu-a", [0, 1], 60.0), placement("small", "gpu-b", [0], 10.0)],
    engines={},
)


def values(name: str, alive: frozenset[str] = frozenset({"gpu-a"})) -> dict[tuple[str, ...], float]:
    found = plan_samples(DEPLOYED, frozenset({"big"}), alive)
    return {tuple(s.labels.values()): s.value for s in found if s.name == name}


def test_every_gpu_of_a_placement_carries_its_booking() -> None:
    assert values("rackserve_booked_bytes") == {
        ("big", "gpu-a", "0"): 60 * GIB,
        ("big", "gpu-a", "1"): 60 * GIB,
        ("small", "gpu-b", "0"): 10 * GIB,
    }
    assert values("rackserve_gpu_memory_utilization")[("big", "gpu-a")] == 0.45
    assert values("rackserve_ray_gpu_fraction")[("small", "gpu-b")] == 0.5


def test_desired_serving_placed_and_nodes_alive() -> None:
    assert values("rackserve_model_desired") == {("big",): 1, ("small",): 1, ("left-out",): 1}
    assert values("rackserve_model_serving") == {("big",): 1, ("small",): 0, ("left-out",): 0}
    assert values("rackserve_model_placed")[("left-out", "")] == 0
    assert values("rackserve_node_alive") == {("gpu-a",): 1, ("gpu-b",): 0}


def test_a_cpu_placement_books_its_node_and_nothing_deployed_exports_nothing() -> None:
    cpu = {**placement("tiny", "head", [], 0.5), "device": "cpu", "gpu_fraction": None}
    cpu["gpu_memory_utilization"] = None
    found = plan_samples(
        Deployed(models=[{"model_id": "tiny"}], placements=[cpu], engines={}),
        frozenset({"tiny"}),
        frozenset({"head"}),
    )
    assert {s.name for s in found} <= set(FAMILIES)
    booked = [s for s in found if s.name == "rackserve_booked_bytes"]
    assert [(dict(s.labels), s.value) for s in booked] == [
        ({"model": "tiny", "node": "head", "gpu": ""}, 0.5 * GIB)
    ]
    assert not any(s.name == "rackserve_ray_gpu_fraction" for s in found)
    assert plan_samples(None, frozenset(), frozenset({"head"})) == []


def test_alive_nodes_carry_their_address_for_joins_with_rays_series() -> None:
    found = plan_samples(
        DEPLOYED, frozenset(), frozenset({"gpu-a"}), {"gpu-a": "10.0.0.1", "gpu-b": "10.0.0.2"}
    )
    addressed = [dict(s.labels) for s in found if s.name == "rackserve_node_address"]
    assert addressed == [{"node": "gpu-a", "ip": "10.0.0.1"}]  # gpu-b is not alive
