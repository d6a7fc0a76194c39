"""`rackserve top`'s arithmetic: rates, quantiles and sums over replicas from two readings."""

from __future__ import annotations

import math

import pytest

from deployer.planning.model_load import (
    FINISHED,
    GENERATED,
    KV_CACHE,
    RUNNING,
    TTFT_BUCKET,
    WAITING,
    histogram_quantile,
    model_loads,
)
from deployer.planning.plan_metrics import Sample


def reading(model: str, replica: str, finished: float, tokens: float, ttft: dict[str, float],
            running: float = 0, waiting: float = 0, kv: float = 0.0) -> list[Sample]:  # fmt: skip
    labels = {"model_name": model, "ReplicaId": replica}
    return [
        Sample(FINISHED, {**labels, "finished_reason": "length"}, finished),
        Sample(GENERATED, labels, tokens),
        Sample(RUNNING, labels, running),
        Sample(WAITING, labels, waiting),
        Sample(KV_CACHE, labels, kv),
        *(Sample(TTFT_BUCKET, {**labels, "le": le}, count) for le, count in ttft.items()),
    ]


def test_quantile_interpolates_within_a_bucket_like_prometheus() -> None:
    buckets = {0.1: 2.0, 0.5: 6.0, 1.0: 8.0, math.inf: 10.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (5 - 2) / 4)
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.95, buckets) == 1.0  # in +Inf: the largest finite bound
    assert histogram_quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.5, {0.1: 3.0}) is None  # no +Inf bucket: not a histogram


def test_rates_sum_replicas_and_quantiles_cover_only_the_window() -> None:
    before = [
        *reading("a", "r1", 10, 1000, {"0.1": 10, "1.0": 10, "+Inf": 10}),
        *reading("a", "r2", 5, 500, {"0.1": 5, "1.0": 5, "+Inf": 5}),
        *reading("b", "r3", 7, 70, {"0.1": 7, "1.0": 7, "+Inf": 7}),
    ]
    after = [
        # a: 4 + 2 more finished, all slow (between 0.1 and 1 s); 2 running on r1, 1 waiting
        *reading("a", "r1", 14, 1400, {"0.1": 10, "1.0": 14, "+Inf": 14}, running=2, kv=0.25),
        *reading("a", "r2", 7, 700, {"0.1": 5, "1.0": 7, "+Inf": 7}, waiting=1, kv=0.5),
        # b restarted: its counters start again from 0
        *reading("b", "r4", 3, 30, {"0.1": 3, "1.0": 3, "+Inf": 3}),
    ]
    loads = model_loads(before, after, 2.0)
    a, b = loads["a"], loads["b"]
    assert (a.requests, a.requests_per_s, a.tokens_per_s) == (21.0, 3.0, 300.0)
    assert a.ttft_p50_s == pytest.approx(0.1 + 0.9 * 3 / 6)  # the 6 new ones, not the 15 fast
    assert (a.running, a.waiting, a.kv_cache_percent) == (2.0, 1.0, 50.0)
    assert (b.requests, b.requests_per_s, b.tokens_per_s) == (3.0, 1.5, 15.0)
    assert b.ttft_p95_s is not None
    assert b.ttft_p95_s <= 0.1


def test_no_traffic_between_readings_has_no_quantile_and_zero_rates() -> None:
    same = reading("a", "r1", 4, 40, {"0.5": 4, "+Inf": 4})
    (load,) = model_loads(same, same, 1.0).values()
    assert (load.requests, load.requests_per_s, load.ttft_p50_s) == (4.0, 0.0, None)
    with pytest.raises(ValueError, match="apart in time"):
        model_loads(same, same, 0.0)
