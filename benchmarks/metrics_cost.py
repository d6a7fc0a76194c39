"""What the per-model engine metrics cost: tokens/s with them on against off, in one run.

rackserve leaves Ray Serve LLM's `log_engine_metrics` on (its default in Ray 2.60): every vLLM
engine records its request, token, latency and KV-cache series through Ray's metrics agent. This
deploys the same tiny model twice under Ray Serve LLM on one local two-node Ray cluster, once
as rackserve runs it (`metrics-on`) and once with the engine metrics and vLLM's stat logging
off (`metrics-off`: `log_engine_metrics=False`, `disable_log_stats=True`), with the same engine
settings, then measures completion throughput through each in alternating rounds, so that drift
of the machine's speed falls on both. Only one of them receives requests at a time.

Run with `nox -s bench_metrics`; the figures go in docs/7-benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.serving import hand_written_app, throughput, wait_answering
from tools.local_ray import HEAD_IP, start_ray_cluster, temp_root
from tools.quickstart import DEFAULT_CACHE, build_models


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    source = build_models(args.cache)["tiny-a"]
    url = f"http://{HEAD_IP}:8000"
    rates: dict[str, list[float]] = {"metrics-on": [], "metrics-off": []}
    with temp_root("rs-bench-") as base, start_ray_cluster(base) as cluster:
        start = time.monotonic()
        hand_written_app(
            cluster.address,
            8000,
            "metrics-cost",
            [
                {"model_id": "metrics-on", "source": str(source), "node": "head"},
                {"model_id": "metrics-off", "source": str(source), "node": "worker"}
                | {"metrics": False},
            ],
        )
        wait_answering(url, list(rates))
        print(f"both engines answering after {time.monotonic() - start:.0f} s", flush=True)
        for model_id in rates:  # warm each up before the first timed round
            throughput(url, model_id, args.concurrency, args.concurrency, 8, rounds=1)
        for _ in range(args.rounds):
            for model_id, measured in rates.items():
                measured.append(
                    throughput(
                        url, model_id, args.concurrency, args.requests, args.tokens, rounds=1
                    )
                )
        print(f"rounds: {rates}", flush=True)
    on, off = (statistics.median(rates[m]) for m in ("metrics-on", "metrics-off"))
    spread = {m: (max(r) - min(r)) / statistics.median(r) for m, r in rates.items()}
    print(
        f"completion throughput, {args.concurrency} concurrent, {args.requests} requests x "
        f"{args.tokens} tokens, median of {args.rounds} alternating rounds (spread max-min)"
    )
    print(f"    engine metrics on    {on:7.0f} tok/s  (spread {spread['metrics-on']:.0%})")
    print(f"    engine metrics off   {off:7.0f} tok/s  (spread {spread['metrics-off']:.0%})")
    print(f"    ratio on/off         {on / off:7.3f}  (target >= 0.97)")


if __name__ == "__main__":
    main()
