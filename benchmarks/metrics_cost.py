"""What the per-model engine metrics cost: tokens/s with them on against off, in one run.

rackserve leaves Ray Serve LLM's `log_engine_metrics` on (its default in Ray 2.60): every vLLM
engine records its request, token, latency and KV-cache series through Ray's metrics agent. This
deploys the same tiny model twice under Ray Serve LLM on one local two-node Ray cluster, once
as rackserve runs it (`metrics-on`) and once with the engine metrics and vLLM's stat logging
off (`metrics-off`: `log_engine_metrics=False`, `disable_log_stats=True`), with the same engine
settings, then measures completion throughput through each in alternating rounds, so that drift
of the machine's speed falls on both. Only one of them receives requests at a time.

Run with `nox -s bench_metrics`; the figures go in the README.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.serving import throughput, wait_answering
from tools.local_ray import HEAD_IP, start_ray_cluster, temp_root
from tools.quickstart import DEFAULT_CACHE, ENGINE, build_models

APP = """
import sys
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app
import ray

address, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
serve.start(proxy_location="HeadOnly", http_options={"host": HEAD_IP, "port": port})
configs = [
    LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": source},
        accelerator_config={"kind": "cpu"},
        placement_group_config={"bundles": [{"CPU": 1}], "strategy": "STRICT_PACK"},
        deployment_config={
            "placement_group_bundle_label_selector": [{"rackserve/node": node}],
            "ray_actor_options": {"num_cpus": 0},
        },
        runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}},
        log_engine_metrics=metrics,
        engine_kwargs={
            "max_model_len": MAX_MODEL_LEN, "max_num_seqs": MAX_NUM_SEQS, "dtype": "bfloat16",
            "enforce_eager": True, "kv_cache_memory_bytes": 64 * 1024**2,
            **({} if metrics else {"disable_log_stats": True}),
        },
    )
    for model_id, node, metrics in (("metrics-on", "head", True), ("metrics-off", "worker", False))
]
app = build_openai_app({"llm_configs": configs,
                        "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}})
serve.run(app, name="metrics-cost", route_prefix="/")
"""


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
    app = (
        APP.replace("HEAD_IP", repr(HEAD_IP))
        .replace("MAX_MODEL_LEN", str(ENGINE["max_model_len"]))
        .replace("MAX_NUM_SEQS", str(ENGINE["max_num_seqs"]))
    )
    url = f"http://{HEAD_IP}:8000"
    rates: dict[str, list[float]] = {"metrics-on": [], "metrics-off": []}
    with temp_root("rs-bench-") as base, start_ray_cluster(base) as cluster:
        start = time.monotonic()
        subprocess.run(
            [sys.executable, "-c", app, cluster.address, "8000", str(source)],
            check=True,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
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
