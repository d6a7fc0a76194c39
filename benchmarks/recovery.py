"""Recovery benchmark: how long each fault keeps a model from answering, against a fresh deploy.

On this machine, in one run, with the quickstart's two tiny vLLM models (the CPU build) on a
local two-node Ray cluster (tiny-a on the head, tiny-b on the worker, the head's GCS in RocksDB
as the ray_head role sets it up), a client thread per model asking all along:

- fresh deploy: from starting `rackserve deploy` until both models answer (the reference);
- engine crash: SIGKILL to tiny-b's vLLM engine core process; Serve restarts the replica;
- head restart: every process of the head killed at once and the head started again; Ray
  reloads its GCS from disk and Serve brings its applications back, no command run;
- cold start: the whole cluster stopped and started empty (a rack power-cycled without GCS
  persistence), then one `rackserve reconcile` redeploys the record of the state directory.

Per fault: seconds from the fault until every model answered again, that time as a ratio of the
fresh deploy, and per model the requests answered and failed. Run with `nox -s bench_recovery`;
the figures go in docs/7-benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tools.client_loop import ClientLoop, wait_answering
from tools.local_ray import RayCluster, restart_head, start_ray_cluster, temp_root
from tools.quickstart import DEFAULT_CACHE, build_models, deploy_args, models_config, rackserve
from tools.serve_processes import engine_process, replica_pids

PORT = 8000
BACK_WITHIN_S = 900.0
PAUSE_S = 0.25
"""Between one model's requests: the client must not starve the engines of two cores."""


@contextlib.contextmanager
def cluster_in(base: Path, gcs: Path | None) -> Iterator[RayCluster]:
    """The quickstart's head and worker; the head's GCS in RocksDB under `gcs` when given."""
    env = {"RAY_gcs_storage": "rocksdb", "RAY_gcs_storage_path": str(gcs)} if gcs else {}
    with start_ray_cluster(base, head_env=env) as cluster:
        yield cluster


def outage(models: list[str], fault: Callable[[], object]) -> dict[str, object]:
    """Run `fault` while a client loop asks every model; what it did to them."""
    with ClientLoop(PORT, models, pause_s=PAUSE_S) as loop:
        for model_id in models:
            loop.wait_answered(model_id, time.monotonic(), 120)
        start = time.monotonic()
        fault()
        back = max(loop.wait_answered(m, start, BACK_WITHIN_S) for m in models) - start
        time.sleep(2)
    return {
        "back_s": round(back, 1),
        "answered": {m: len(c.answered) for m, c in loop.counts.items()},
        "failed": {m: len(c.failed) for m, c in loop.counts.items()},
    }


def kill_engine(address: str, model_id: str) -> Callable[[], object]:
    """SIGKILL to the model's vLLM engine core process."""
    pid, _ = engine_process(replica_pids(address)[f"rackserve-model:{model_id}"])
    return lambda: os.kill(pid, signal.SIGKILL)


def measure(cache: Path) -> dict[str, dict[str, object]]:
    sources = build_models(cache)
    models = list(sources)
    results: dict[str, dict[str, object]] = {}
    with temp_root("rs-bench-rec-") as base:
        state = base / "state"
        models_file = base / "models.json"
        with cluster_in(base / "nodes", base / "gcs") as cluster:
            models_file.write_text(json.dumps(models_config(sources, cluster.node_names)))
            start = time.monotonic()
            rackserve(*deploy_args(models_file, cluster.address, PORT), "--state-dir", str(state))
            results["fresh deploy"] = {
                "back_s": round(wait_answering(PORT, models, BACK_WITHIN_S) - start, 1)
            }
            print(f"measured fresh deploy: {results['fresh deploy']}", flush=True)
            results["engine crash"] = outage(models, kill_engine(cluster.address, "tiny-b"))
            print(f"measured engine crash: {results['engine crash']}", flush=True)
            results["head restart"] = outage(models, lambda: restart_head(cluster))
            print(f"measured head restart: {results['head restart']}", flush=True)
        with cluster_in(base / "cold", None) as cluster:
            start = time.monotonic()
            rackserve("reconcile", "--address", cluster.address, "--state-dir", str(state))
            back = wait_answering(PORT, models, BACK_WITHIN_S) - start
            results["cold start"] = {"back_s": round(back, 1)}
            print(f"measured cold start: {results['cold start']}", flush=True)
    return results


def table(results: dict[str, dict[str, object]]) -> str:
    reference = float(str(results["fresh deploy"]["back_s"]))
    lines = [
        "| fault | every model answers again after | ratio to a fresh deploy | "
        "requests answered / failed per model |",
        "|---|---|---|---|",
    ]
    for fault, seen in results.items():
        back = float(str(seen["back_s"]))
        answered, failed = seen.get("answered"), seen.get("failed")
        counts = (
            ", ".join(f"{m} {answered[m]} / {failed[m]}" for m in answered)
            if isinstance(answered, dict) and isinstance(failed, dict)
            else "-"
        )
        lines.append(f"| {fault} | {back:.1f} s | {back / reference:.2f} | {counts} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    results = measure(args.cache)
    print(json.dumps(results))
    print(table(results))


if __name__ == "__main__":
    main()
