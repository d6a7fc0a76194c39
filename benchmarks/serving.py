"""Serving benchmark: rackserve against hand-written Ray Serve LLM and plain `vllm serve`.

On this machine, in one run, with the quickstart's two tiny models (vLLM's CPU build):

(a) time to serve: from starting `rackserve deploy` until both models answer a chat
    completion, against a minimal hand-written Ray Serve LLM script (`build_openai_app`, the
    same two models, the same pins) on the same local two-node Ray cluster;
(b) completion throughput: tokens/s with 8 concurrent requests through the rackserve
    application, against plain `vllm serve` of the same model with the same engine settings.

Run with `nox -s bench`; the figures go in the README.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tools.local_ray import HEAD_IP, start_ray_cluster, temp_root
from tools.quickstart import (
    DEFAULT_CACHE,
    ENGINE,
    build_models,
    deploy_args,
    http_json,
    models_config,
)

HAND_WRITTEN = """
import json, sys
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app
import ray

address, port, name, engines = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.2", "port": port})
configs = [
    LLMConfig(
        model_loading_config={"model_id": e["model_id"], "model_source": e["source"]},
        accelerator_config={"kind": "cpu"},
        placement_group_config={"bundles": [{"CPU": 1}], "strategy": "STRICT_PACK"},
        deployment_config={
            "placement_group_bundle_label_selector": [{"rackserve/node": e["node"]}],
            "ray_actor_options": {"num_cpus": 0},
        },
        runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}},
        log_engine_metrics=e.get("metrics", True),
        engine_kwargs={
            "max_model_len": 512, "max_num_seqs": 8, "dtype": "bfloat16",
            "enforce_eager": True, "kv_cache_memory_bytes": 64 * 1024**2,
            **({} if e.get("metrics", True) else {"disable_log_stats": True}),
        },
    )
    for e in engines
]
app = build_openai_app({"llm_configs": configs,
                        "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}})
serve.run(app, name=name, route_prefix="/")
"""


def hand_written_app(address: str, port: int, name: str, engines: list[dict[str, Any]]) -> None:
    """Deploy `engines` (model_id, source, node, and metrics: False to turn the engine metrics
    and vLLM's stat logging off) as a hand-written Ray Serve LLM application named `name`."""
    run(
        [sys.executable, "-c", HAND_WRITTEN, address, str(port), name, json.dumps(engines)],
        capture_output=True,
    )


# `vllm serve MODEL ...`. The `vllm` command looks up its version under the distribution name
# "vllm", which the CPU build registers as "vllm-cpu": answer for it (with the "+cpu" local
# version vLLM's platform detection looks for), then run the command.
VLLM_SERVE = """
import importlib.metadata as metadata, sys
version = metadata.version
metadata.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)
sys.argv = ["vllm", "serve", *sys.argv[1:]]
from vllm.entrypoints.cli.main import main
main()
"""


def wait_answering(
    base_url: str,
    model_ids: list[str],
    timeout_s: float = 600.0,
    server: subprocess.Popen[bytes] | None = None,
) -> None:
    """Until every model answers a one-token chat completion (or the server process dies)."""
    deadline = time.monotonic() + timeout_s
    pending = list(model_ids)
    while pending:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}; see its log")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{pending} did not answer within {timeout_s:.0f} s")
        try:
            http_json(
                f"{base_url}/v1/chat/completions",
                {
                    "model": pending[0],
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 1,
                },
                timeout=30,
            )
            pending.pop(0)
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(0.5)


def throughput(
    base_url: str, model_id: str, concurrency: int, requests: int, tokens: int, rounds: int = 3
) -> float:
    """Completion tokens per second with `concurrency` requests in flight (median of rounds)."""

    def one(_: int) -> int:
        answer = http_json(
            f"{base_url}/v1/completions",
            {
                "model": model_id,
                "prompt": "def main(",
                "max_tokens": tokens,
                "ignore_eos": True,
                "temperature": 0.0,
            },
        )
        return int(answer["usage"]["completion_tokens"])

    one(0)  # warm up
    rates = []
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(rounds):
            start = time.monotonic()
            produced = sum(pool.map(one, range(requests)))
            rates.append(produced / (time.monotonic() - start))
    return statistics.median(rates)


def plain_vllm_throughput(args: argparse.Namespace, model: Path, env: dict[str, str]) -> float:
    """Throughput of `vllm serve MODEL` with the quickstart's engine settings, plus `env`."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", **env)
    url = f"http://{HEAD_IP}:8002"
    with (args.cache / "vllm-serve.log").open("w") as log:
        server = subprocess.Popen(
            [
                sys.executable, "-c", VLLM_SERVE, str(model),
                "--served-model-name", "tiny-a",
                "--host", HEAD_IP, "--port", "8002",
                "--dtype", "bfloat16",
                "--max-model-len", str(ENGINE["max_model_len"]),
                "--max-num-seqs", str(ENGINE["max_num_seqs"]),
                "--enforce-eager",
            ],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            wait_answering(url, ["tiny-a"], server=server)
            return throughput(url, "tiny-a", args.concurrency, args.requests, args.tokens)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, stdin=subprocess.DEVNULL, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    sources = build_models(args.cache)
    models_file = args.cache / "bench-models.json"
    results: dict[str, float] = {}
    url = f"http://{HEAD_IP}:8000"
    # Each deployment gets a fresh Ray cluster: neither finds Serve already started.
    with temp_root("rs-bench-") as base, start_ray_cluster(base) as cluster:
        models_file.write_text(json.dumps(models_config(sources, cluster.node_names)))
        start = time.monotonic()
        run(
            [sys.executable, "-m", "deployer", *deploy_args(models_file, cluster.address, 8000)],
            capture_output=True,
        )
        wait_answering(url, list(sources))
        results["rackserve_deploy_s"] = time.monotonic() - start
        results["rackserve_tok_s"] = throughput(
            url, "tiny-a", args.concurrency, args.requests, args.tokens
        )
        print(f"measured rackserve: {results}", flush=True)
    with temp_root("rs-bench-") as base, start_ray_cluster(base) as cluster:
        start = time.monotonic()
        hand_written_app(
            cluster.address,
            8000,
            "hand",
            [
                {"model_id": "tiny-a", "source": str(sources["tiny-a"]), "node": "head"},
                {"model_id": "tiny-b", "source": str(sources["tiny-b"]), "node": "worker"},
            ],
        )
        wait_answering(url, list(sources))
        results["hand_deploy_s"] = time.monotonic() - start
        print(f"measured hand-written: {results['hand_deploy_s']:.1f} s", flush=True)
    # Ray is stopped: plain vLLM gets the machine to itself, as `vllm serve` would. Under Ray
    # the engine's actor holds one CPU and Ray sets OMP_NUM_THREADS=1 for it; plain vLLM is
    # measured both that way and with its own default (all cores), so that the ratio compares
    # like with like and the thread count's effect shows.
    for label, threads in (("vllm_tok_s_1thread", {"OMP_NUM_THREADS": "1"}), ("vllm_tok_s", {})):
        results[label] = plain_vllm_throughput(args, sources["tiny-a"], threads)
        print(f"measured plain vLLM {threads or 'default threads'}: {results[label]:.0f} tok/s")

    print("(a) time from deploy to both models answering (2 tiny models, 2 local Ray nodes)")
    print(f"    rackserve deploy        {results['rackserve_deploy_s']:6.1f} s")
    print(f"    hand-written Serve LLM  {results['hand_deploy_s']:6.1f} s")
    deploy_ratio = results["rackserve_deploy_s"] / results["hand_deploy_s"]
    print(f"    ratio rackserve/hand    {deploy_ratio:6.2f}")
    print(
        f"(b) completion throughput, {args.concurrency} concurrent, "
        f"{args.requests} requests x {args.tokens} tokens, median of 3 rounds"
    )
    print(f"    rackserve application   {results['rackserve_tok_s']:7.0f} tok/s")
    one_thread, default = results["vllm_tok_s_1thread"], results["vllm_tok_s"]
    print(f"    plain vllm serve, 1 thread  {one_thread:7.0f} tok/s (as Ray runs the engine)")
    print(f"    plain vllm serve, default   {default:7.0f} tok/s (OMP threads = all cores)")
    print(f"    ratio rackserve/vllm (1 thread) {results['rackserve_tok_s'] / one_thread:7.2f}")


if __name__ == "__main__":
    main()
