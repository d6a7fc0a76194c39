"""The drift check's verdicts, and how `rackserve status` shows them."""

from __future__ import annotations

from typing import Any

import pytest

from deployer.cli.render import memory_cells
from deployer.config.units import GIB
from deployer.planning.drift import OVER_TOLERANCE, UNDER_FRACTION, Drift, drift, verdict

pytestmark = pytest.mark.unit


def gpu_placement(model_id: str, gpus: list[int], gib: float, extra: float = 0.0) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "node": "gpu-1",
        "device": "gpu",
        "gpus": gpus,
        "tensor_parallel_size": len(gpus),
        "gpu_memory_gib": gib,
        "extra_kv_gib": extra,
    }


def cpu_placement(model_id: str, gib: float) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "node": "cpu-1",
        "device": "cpu",
        "gpus": [],
        "tensor_parallel_size": 1,
        "gpu_memory_gib": gib,
        "extra_kv_gib": 0.0,
    }


@pytest.mark.parametrize(
    ("used", "expected"),
    [
        (None, "unmeasured"),
        (0, "under"),
        (499, "under"),
        (500, "ok"),
        (1000, "ok"),
        (1020, "ok"),  # within the 2% tolerance
        (1021, "over"),
    ],
)
def test_verdict_thresholds(used: int | None, expected: str) -> None:
    assert OVER_TOLERANCE == 0.02
    assert UNDER_FRACTION == 0.5
    assert verdict(1000, used) == expected


def test_thresholds_are_parameters() -> None:
    assert verdict(1000, 600, under_fraction=0.8) == "under"
    assert verdict(1000, 1010, over_tolerance=0.0) == "over"
    assert verdict(1000, 1010, over_tolerance=0.05) == "ok"


def test_a_tensor_parallel_placement_gets_one_verdict_per_gpu() -> None:
    # Booked per GPU: 10 GiB footprint + 2 GiB of leftover KV handed to the engine.
    placements = [gpu_placement("tp", [2, 3], 10.0, extra=2.0)]
    usage = {"tp": {2: 12 * GIB, 3: 13 * GIB, None: 3 * GIB}}

    found = drift(placements, usage)

    assert found == [
        Drift("tp", "gpu-1", 2, 12 * GIB, 12 * GIB, "ok"),
        Drift("tp", "gpu-1", 3, 12 * GIB, 13 * GIB, "over"),
    ]


def test_an_engine_far_under_its_booking_wastes_memory_and_a_gpu_not_read_is_unmeasured() -> None:
    placements = [gpu_placement("small", [0], 20.0), gpu_placement("tp", [0, 1], 8.0)]
    usage = {"small": {0: 4 * GIB}, "tp": {0: 8 * GIB}}  # GPU 1 of tp had no NVML figure

    found = {(d.model_id, d.gpu): d.verdict for d in drift(placements, usage)}

    assert found == {("small", 0): "under", ("tp", 0): "ok", ("tp", 1): "unmeasured"}


def test_cpu_placements_are_measured_by_resident_memory() -> None:
    placements = [cpu_placement("a", 6.0), cpu_placement("b", 6.0), cpu_placement("c", 6.0)]
    usage = {"a": {None: 5 * GIB}, "b": {None: 7 * GIB, 0: 0}, "c": {0: 6 * GIB}}

    found = drift(placements, usage)

    assert [(d.model_id, d.gpu, d.booked_bytes, d.used_bytes, d.verdict) for d in found] == [
        ("a", None, 6 * GIB, 5 * GIB, "ok"),
        ("b", None, 6 * GIB, 7 * GIB, "over"),
        ("c", None, 6 * GIB, None, "unmeasured"),  # a GPU figure is no RSS
    ]


def test_models_with_no_running_engine_are_unmeasured() -> None:
    found = drift([gpu_placement("a", [0], 5.0), cpu_placement("b", 2.0)], {})

    assert [(d.used_bytes, d.verdict) for d in found] == [(None, "unmeasured")] * 2


def cells(drifts: list[Drift]) -> tuple[str, str, str]:
    booked, used, flag = memory_cells(drifts)
    return booked, used, flag.plain


def test_status_flags_the_worst_device_and_shows_totals() -> None:
    ok = Drift("m", "n", 0, 10 * GIB, 9 * GIB, "ok")
    over = Drift("m", "n", 1, 10 * GIB, 11 * GIB, "over")
    under = Drift("m", "n", 1, 10 * GIB, 1 * GIB, "under")
    unmeasured = Drift("m", "n", 1, 10 * GIB, None, "unmeasured")

    assert cells([ok, over]) == ("20.00", "20.00", "over booking")
    assert cells([under, ok]) == ("20.00", "10.00", "wasted")
    assert cells([ok, ok]) == ("20.00", "18.00", "ok")
    assert cells([ok, unmeasured]) == ("20.00", "-", "-")
    assert cells([]) == ("-", "-", "-")
