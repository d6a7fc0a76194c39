"""How busy each model is, from two readings of vLLM's metrics (`rackserve top`). Pure.

vLLM's engines export, through Ray, series labelled `model_name` (`ray_vllm_*`): counters of
finished requests and generated tokens, a time-to-first-token histogram, and gauges of running
and waiting requests and of KV cache use. Two readings `seconds` apart give rates; the
histogram's growth between them gives the time to first token of the requests that started
in between (Prometheus's `histogram_quantile`, linear within a bucket). A model served by
several replicas sums their series.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

from deployer.planning.plan_metrics import Sample

FINISHED = "ray_vllm_request_success_total"
GENERATED = "ray_vllm_generation_tokens_total"
TTFT_BUCKET = "ray_vllm_time_to_first_token_seconds_bucket"
RUNNING = "ray_vllm_num_requests_running"
WAITING = "ray_vllm_num_requests_waiting"
KV_CACHE = "ray_vllm_kv_cache_usage_perc"
SERIES = (FINISHED, GENERATED, TTFT_BUCKET, RUNNING, WAITING, KV_CACHE)
"""The series a reading needs."""


@dataclasses.dataclass(frozen=True)
class ModelLoad:
    """One model's load, as the second reading saw it."""

    model_id: str
    requests: float
    """Requests its engines finished since they started."""
    requests_per_s: float
    tokens_per_s: float
    """Generated tokens per second."""
    ttft_p50_s: float | None
    """Median time to first token of requests between the readings; None when there were none."""
    ttft_p95_s: float | None
    running: float
    waiting: float
    kv_cache_percent: float | None
    """The fullest replica's KV cache use, 0 to 100; None when not reported."""


def _by_model(samples: Iterable[Sample], name: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for sample in samples:
        model = sample.labels.get("model_name")
        if sample.name == name and model is not None and not math.isnan(sample.value):
            totals[model] = totals.get(model, 0.0) + sample.value
    return totals


def _buckets(samples: Iterable[Sample]) -> dict[str, dict[float, float]]:
    """Per model, cumulative counts by upper bound (`le`), summed over replicas."""
    found: dict[str, dict[float, float]] = {}
    for sample in samples:
        model = sample.labels.get("model_name")
        if sample.name == TTFT_BUCKET and model is not None and "le" in sample.labels:
            bounds = found.setdefault(model, {})
            le = float(sample.labels["le"])
            bounds[le] = bounds.get(le, 0.0) + sample.value
    return found


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The q-quantile of cumulative bucket counts, as Prometheus's `histogram_quantile` has it.

    Linear within the bucket; the largest finite bound when it falls in `+Inf`.
    """
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return None


def _rate(now: float, then: float | None, seconds: float) -> float:
    """A counter's growth per second.

    One that went down (its engine restarted) or was not there before counts from zero.
    """
    grown = now if then is None or now < then else now - then
    return grown / seconds


def model_loads(
    before: Iterable[Sample], after: Iterable[Sample], seconds: float
) -> dict[str, ModelLoad]:
    """Each model seen in the second reading, with rates over the `seconds` between the two."""
    before, after = list(before), list(after)
    if seconds <= 0:
        raise ValueError(f"readings must be apart in time, not {seconds} s")
    finished_then, finished = _by_model(before, FINISHED), _by_model(after, FINISHED)
    generated_then, generated = _by_model(before, GENERATED), _by_model(after, GENERATED)
    buckets_then, buckets = _buckets(before), _buckets(after)
    running, waiting = _by_model(after, RUNNING), _by_model(after, WAITING)
    fullest: dict[str, float] = {}
    for sample in after:
        model = sample.labels.get("model_name")
        if sample.name == KV_CACHE and model is not None:
            fullest[model] = max(fullest.get(model, 0.0), sample.value * 100.0)
    loads = {}
    for model in sorted(set(finished) | set(running) | set(fullest)):
        then_buckets = buckets_then.get(model, {})
        window = {
            le: count - then_buckets.get(le, 0.0) for le, count in buckets.get(model, {}).items()
        }
        if any(count < 0 for count in window.values()):  # restarted: all it has seen
            window = dict(buckets.get(model, {}))
        loads[model] = ModelLoad(
            model_id=model,
            requests=finished.get(model, 0.0),
            requests_per_s=_rate(finished.get(model, 0.0), finished_then.get(model), seconds),
            tokens_per_s=_rate(generated.get(model, 0.0), generated_then.get(model), seconds),
            ttft_p50_s=histogram_quantile(0.5, window),
            ttft_p95_s=histogram_quantile(0.95, window),
            running=running.get(model, 0.0),
            waiting=waiting.get(model, 0.0),
            kv_cache_percent=fullest.get(model),
        )
    return loads
