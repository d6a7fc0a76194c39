"""The drift check: each engine's measured memory against what the plan booked for it.

Pure: the deployed placements (as `Placement.as_json` writes them) and what was measured go in,
one `Drift` per model and device comes out. A GPU placement books memory on each of its GPUs
(its footprint plus the leftover KV cache the plan handed it, which vLLM allocates up front); a
CPU placement books the node's RAM for weights and KV cache. Measured figures come from
`deployer.serving.engine_memory`: NVML per process on GPUs, resident memory on CPU nodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from deployer.config.units import GIB

OVER_TOLERANCE = 0.02
"""How far above its booking an engine may measure before it is over: NVML and resident figures
move by a few MiB between readings (allocator caches, pages touched late) and the record keeps
bookings to a MiB or so; anything beyond that eats memory another engine was promised."""

UNDER_FRACTION = 0.5
"""Below this fraction of its booking an engine is flagged as wasting memory: the plan holds the
rest for it, so no other model can be placed there, while a small shortfall is normal (vLLM
sizes its KV cache in whole blocks, CPU pages are touched lazily)."""

Verdict = Literal["over", "under", "ok", "unmeasured"]

Usage = Mapping[str, Mapping[int | None, int]]
"""Measured bytes per model id: per NVML GPU index on its node, and under None its engine's
resident memory (what a CPU placement is measured by). A device missing was not measured."""


@dataclasses.dataclass(frozen=True)
class Drift:
    """One model's memory on one device (a GPU, or its CPU node when `gpu` is None)."""

    model_id: str
    node: str
    gpu: int | None
    booked_bytes: int
    used_bytes: int | None
    """None when it could not be measured (no running engine, no NVML, node unreachable)."""
    verdict: Verdict


def verdict(
    booked: int,
    used: int | None,
    under_fraction: float = UNDER_FRACTION,
    over_tolerance: float = OVER_TOLERANCE,
) -> Verdict:
    """Over the booking (beyond the tolerance), far under it, within it, or not measured."""
    if used is None:
        return "unmeasured"
    if used > booked * (1.0 + over_tolerance):
        return "over"
    if used < booked * under_fraction:
        return "under"
    return "ok"


def booked_bytes(placement: Mapping[str, Any]) -> int:
    """Bytes a placement books on each of its devices: footprint plus the extra KV it was given."""
    return round(
        (float(placement["gpu_memory_gib"]) + float(placement.get("extra_kv_gib", 0.0))) * GIB
    )


def drift(
    placements: Sequence[Mapping[str, Any]],
    usage: Usage,
    under_fraction: float = UNDER_FRACTION,
    over_tolerance: float = OVER_TOLERANCE,
) -> list[Drift]:
    """One `Drift` per placement and device, in the placements' order, GPUs in theirs."""
    drifts = []
    for placement in placements:
        model_id = placement["model_id"]
        booked = booked_bytes(placement)
        measured = usage.get(model_id, {})
        for gpu in placement["gpus"] or [None]:
            used = measured.get(gpu)
            drifts.append(
                Drift(
                    model_id=model_id,
                    node=placement["node"],
                    gpu=gpu,
                    booked_bytes=booked,
                    used_bytes=used,
                    verdict=verdict(booked, used, under_fraction, over_tolerance),
                )
            )
    return drifts
