"""The one-machine quickstart: two tiny models served by rackserve on a local two-node Ray cluster.

`nox -s quickstart` runs `python -m tools.quickstart`: it builds two tiny Llama-style models
into a cache folder, starts a Ray head (127.0.0.2) and a worker (127.0.0.3), runs
`rackserve deploy` with each model pinned to a different node, prints the plan, the raw JSON of
`GET /v1/models` and one chat completion from each model, then stops the Ray processes it
started. No model hub is used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tools.local_ray import HEAD_IP, RayCluster, start_ray_cluster, temp_root

MODEL_IDS = ("tiny-a", "tiny-b")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rackserve"
HTTP_PORT = 8000
# vLLM's CPU engine settings that work on a 2-core machine (docs/ray-and-vllm-facts.md)
ENGINE = {"max_model_len": 512, "max_num_seqs": 8, "dtype": "bfloat16", "overhead_gib": 1.0}


def build_models(cache: Path) -> dict[str, Path]:
    """The two tiny models, built once into the cache."""
    from tools.tiny_models import build_tiny_model  # noqa: PLC0415 - needs torch

    return {
        model_id: build_tiny_model(cache / "models" / model_id, seed=seed)
        for seed, model_id in enumerate(MODEL_IDS, start=1)
    }


def models_config(sources: dict[str, Path], nodes: Sequence[str]) -> dict[str, Any]:
    """The models file: each model pinned to its own node."""
    return {
        "models": [
            {
                "model_id": model_id,
                "model_source": str(source),
                "node": node,
                **ENGINE,
                "engine_kwargs": {"enforce_eager": True},
            }
            for (model_id, source), node in zip(sources.items(), nodes, strict=True)
        ]
    }


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
    """GET (or POST a JSON body) and decode the JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def deploy_args(models_file: Path, address: str, port: int) -> list[str]:
    """`rackserve deploy` arguments for the local cluster, the endpoint on the head's address."""
    return [
        "deploy",
        "--models",
        str(models_file),
        "--address",
        address,
        "--http-host",
        HEAD_IP,
        "--http-port",
        str(port),
        "--no-auth",  # the quickstart's endpoint listens on loopback only
    ]


def rackserve(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real command line, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "deployer", *args],
        check=check,
        text=True,
        stdin=subprocess.DEVNULL,
    )


@contextmanager
def local_cluster() -> Iterator[RayCluster]:
    """A head and a worker on loopback addresses, stopped by PID on exit."""
    with temp_root("rs-qs-") as base, start_ray_cluster(base) as cluster:
        yield cluster


def chat(base_url: str, model_id: str, content: str = "Say hello.") -> dict[str, Any]:
    """One chat completion."""
    answer: dict[str, Any] = http_json(
        f"{base_url}/v1/chat/completions",
        {"model": model_id, "messages": [{"role": "user", "content": content}], "max_tokens": 16},
    )
    return answer


def main(argv: Sequence[str] | None = None) -> int:
    """Run the quickstart; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where models are built")
    parser.add_argument("--port", type=int, default=HTTP_PORT, help="HTTP port of the endpoint")
    args = parser.parse_args(argv)

    started = time.monotonic()
    sources = build_models(args.cache)
    print(f"built {', '.join(sources)} in {args.cache / 'models'}", flush=True)
    with local_cluster() as cluster:
        print(f"Ray head {cluster.address}, nodes {', '.join(cluster.node_names)}", flush=True)
        models_file = args.cache / "quickstart-models.json"
        models_file.write_text(json.dumps(models_config(sources, cluster.node_names), indent=2))
        rackserve(*deploy_args(models_file, cluster.address, args.port))
        base_url = f"http://{HEAD_IP}:{args.port}"
        print(f"\nGET {base_url}/v1/models", flush=True)
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=30) as response:
            print(response.read().decode(), flush=True)
        for model_id in sources:
            answer = chat(base_url, model_id)
            text = answer["choices"][0]["message"]["content"]
            print(f"\nPOST /v1/chat/completions model={model_id}\n  -> {text!r}", flush=True)
        rackserve("status", "--address", cluster.address)
        print("\nrackserve top --once: the engines' figures, from Ray's metrics", flush=True)
        rackserve("top", "--once", "--interval-s", "1", "--address", cluster.address)
    print(f"\nquickstart done in {time.monotonic() - started:.0f} s; Ray stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
