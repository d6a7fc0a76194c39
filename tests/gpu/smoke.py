"""The GPU smoke checks; `tests/gpu/smoke.sh` starts a one-node Ray and runs this.

On a machine with an NVIDIA GPU (vLLM's CUDA build installed), in under 8 minutes:

1. `probe-vs-nvidia-smi`: `rackserve probe` against `nvidia-smi`, per GPU (total exactly, free
   within a tolerance);
2. `plan-co-locates`: two small models of real architectures (Qwen2.5-0.5B's and Llama-3.2-1B's
   shapes, random weights, built locally: tests/gpu/real_models.py) estimated
   (`rackserve estimate`) and planned (`rackserve plan`) on the probed cluster: both share one GPU;
3. `deploy-as-planned`: `rackserve deploy` of that plan: both engines healthy on the planned
   node and GPU;
4. `co-located-answer`: one completion from each model through the one endpoint;
5. `estimate-vs-vllm`: the estimate against what each vLLM engine logs (weights loaded, KV cache
   GiB and tokens), a table;
6. `memory-measured-vs-planned`: each engine's processes' memory in `nvidia-smi` against the
   plan's budget (`gpu_memory_utilization` x total + the CUDA context), a table;
7. `run-time`: the whole run within its 8 minutes.

`--rehearse` runs the same steps on any machine: Ray has one logical GPU
(`ray start --num-gpus 1`), the plan comes from a cluster file declaring an H200, the deploy
runs the stand-in engine (`--engine standin`) on the bundles vLLM would get, and the stand-ins'
reports are checked against the plan (`standin-matches-plan`); only what needs CUDA is skipped,
each with a `SKIP <check>: needs a GPU` line. Exit 0 when no check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError

import yaml

from deployer.config.cluster import parse_cluster
from deployer.config.units import MIB
from deployer.planning.estimate import CUDA_CONTEXT_GIB
from tests.gpu.measure import (
    VllmReport,
    memory_of,
    parse_smi_gpus,
    parse_smi_processes,
    parse_vllm_report,
)

NODE = "gpu-smoke"
TIME_LIMIT_S = 480.0
DEPLOY_TIMEOUT_S = 330.0
FREE_TOLERANCE_MIB = int(os.environ.get("SMOKE_FREE_TOLERANCE_MIB", "512"))
WEIGHTS_TOLERANCE = 0.05  # relative, plus 0.05 GiB: vLLM's figure is rounded to 0.01 GiB
MEMORY_TOLERANCE_GIB = 0.25
MODELS = {"smoke-qwen": "qwen2.5-0.5b", "smoke-llama": "llama-3.2-1b"}
ENGINE = {"max_model_len": 4096, "max_num_seqs": 4, "dtype": "bfloat16"}
# The rehearsal's logical GPU: an H200 as NVML reports it (141 GiB; 143771 MiB total).
LOGICAL_GPU = {
    "index": 0,
    "name": "NVIDIA H200",
    "memory_total_mib": 143771,
    "memory_free_mib": 143252,
}
NEEDS_GPU = "needs a GPU"
GIB = 1024**3


@dataclasses.dataclass
class Smoke:
    """One run: where things are, and the summary lines so far."""

    out: Path
    rehearse: bool
    address: str = ""
    dashboard: str = ""
    ray_logs: Path | None = None
    http_port: int = 8000
    cache: Path = Path.home() / ".cache" / "rackserve" / "gpu-smoke"
    lines: list[str] = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.monotonic)

    def report(self, status: str, check: str, figures: str) -> bool:
        """Print and keep one summary line; True when it is not a failure."""
        line = f"{status} {check}: {figures}"
        self.lines.append(line)
        print(f"\n{line}\n", flush=True)
        return status != "FAIL"

    def failed(self) -> bool:
        """Whether any check failed."""
        return any(line.startswith("FAIL ") for line in self.lines)

    @property
    def base_url(self) -> str:
        """The endpoint on the head."""
        return f"http://127.0.0.2:{self.http_port}"


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def rackserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real command line; its output goes to the terminal as well as into the result."""
    print(f"$ rackserve {' '.join(args)}", flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "deployer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    print(done.stdout + done.stderr, end="", flush=True)
    return done


def nvidia_smi(*query: str) -> str:
    """`nvidia-smi <query> --format=csv,noheader,nounits`."""
    argv = ["nvidia-smi", *query, "--format=csv,noheader,nounits"]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout


# ------------------------------------------------------------------------------ 1. probe


def check_probe(smoke: Smoke, probed: Path) -> None:
    """The probe's cluster file against nvidia-smi (GPU), or the probe's CPU view (rehearsal)."""
    (node,) = parse_cluster(probed.read_text()).nodes
    if smoke.rehearse:
        smoke.report(
            "SKIP",
            "probe-vs-nvidia-smi",
            f"{NEEDS_GPU} (the probe ran: node "
            f"{node.name}, {len(node.gpus)} GPU(s) through NVML, "
            f"{(node.cpu_memory_mib or 0) / 1024:.1f} GiB of CPU memory)",
        )
        return
    smi = parse_smi_gpus(nvidia_smi("--query-gpu=index,name,memory.total,memory.free,memory.used"))
    print(f"driver {node.driver_version}; {len(node.gpus)} GPU(s) probed, {len(smi)} in nvidia-smi")
    print(
        f"{'GPU':>3}  {'name':<28} {'total probe':>11} {'total smi':>9} {'free probe':>10} "
        f"{'free smi':>8}  ok"
    )
    bad = [] if len(node.gpus) == len(smi) else [f"{len(node.gpus)} probed, {len(smi)} in smi"]
    for gpu in node.gpus:
        row = smi.get(gpu.index)
        ok = (
            row is not None
            and gpu.memory_total_mib == row.total_mib
            and abs(gpu.memory_free_mib - row.free_mib) <= FREE_TOLERANCE_MIB
        )
        if row is None or not ok:
            bad.append(f"GPU {gpu.index}")
        print(
            f"{gpu.index:>3}  {gpu.name[:28]:<28} {gpu.memory_total_mib:>11} "
            f"{row.total_mib if row else '-':>9} {gpu.memory_free_mib:>10} "
            f"{row.free_mib if row else '-':>8}  {'yes' if ok else 'NO'}"
        )
    figures = ", ".join(
        f"GPU {g.index} {g.name} total {g.memory_total_mib} MiB, free {g.memory_free_mib} MiB"
        for g in node.gpus
    )
    if bad:
        smoke.report("FAIL", "probe-vs-nvidia-smi", f"mismatch: {', '.join(bad)} ({figures})")
    else:
        smoke.report(
            "PASS",
            "probe-vs-nvidia-smi",
            f"{figures}; free within {FREE_TOLERANCE_MIB} MiB of nvidia-smi",
        )


# ------------------------------------------------------------------------------ 2. plan


def models_file(smoke: Smoke) -> Path:
    """The two real-shape models (built once into the cache) as a models file."""
    from tests.gpu.real_models import build_real_shape  # noqa: PLC0415 - needs torch

    started = time.monotonic()
    sources = {model_id: build_real_shape(shape, smoke.cache) for model_id, shape in MODELS.items()}
    print(
        f"models {', '.join(f'{m} ({s})' for m, s in MODELS.items())} in {smoke.cache} "
        f"({time.monotonic() - started:.0f} s)",
        flush=True,
    )
    document = {
        "models": [
            {"model_id": model_id, "model_source": str(source), **ENGINE}
            for model_id, source in sources.items()
        ]
    }
    path = smoke.out / "models.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def logical_cluster(smoke: Smoke) -> Path:
    """The rehearsal's cluster file: the Ray head with one logical H200."""
    path = smoke.out / "cluster-logical.yaml"
    path.write_text(yaml.safe_dump({"nodes": [{"name": NODE, "gpus": [LOGICAL_GPU]}]}))
    return path


def check_plan(smoke: Smoke, plan: dict[str, Any], total_gib: float) -> bool:
    """Both models placed on one GPU of the one node, their fractions and budgets within it."""
    placements = plan["placements"]
    where = {(p["node"], tuple(p["gpus"])) for p in placements}
    fractions = sum(p["gpu_fraction"] for p in placements)
    utilization = sum(p["gpu_memory_utilization"] for p in placements)
    booked = utilization * total_gib + CUDA_CONTEXT_GIB * len(placements)
    figures = (
        " + ".join(f"{p['model_id']} {p['gpu_memory_utilization']:.4f}" for p in placements)
        + f" = {utilization:.4f} gpu_memory_utilization, {booked:.1f} of {total_gib:.1f} GiB "
        f"with CUDA contexts; Ray fractions {fractions:.4f}"
    )
    ok = (
        len(placements) == len(MODELS)
        and not plan["unplaced"]
        and len(where) == 1
        and all(node == NODE and len(gpus) == 1 for node, gpus in where)
        and fractions <= 1
        and booked <= total_gib
    )
    if not ok:
        figures += f"; placed on {sorted(where)}, unplaced {plan['unplaced']}"
    return smoke.report("PASS" if ok else "FAIL", "plan-co-locates", figures)


# ------------------------------------------------------------------------------ 3, 4. deploy


def check_deploy(smoke: Smoke, plan: dict[str, Any], seconds: float) -> bool:
    """`rackserve status`: each model healthy on the node and GPUs of the plan."""
    from deployer.serving.launch import model_statuses  # noqa: PLC0415 - needs Ray

    rackserve("status", "--address", smoke.address)
    statuses = {s.model_id: s for s in model_statuses(smoke.address)}
    wrong = []
    for placement in plan["placements"]:
        status = statuses.get(placement["model_id"])
        if status is None or not status.healthy:
            wrong.append(f"{placement['model_id']} {status.state if status else 'missing'}")
        elif (status.node, list(status.gpus)) != (placement["node"], placement["gpus"]):
            wrong.append(f"{placement['model_id']} on {status.node} GPUs {status.gpus}")
    engine = "stand-in" if smoke.rehearse else "vLLM"
    figures = f"{len(statuses)} {engine} engine(s) deployed in {seconds:.0f} s; " + ", ".join(
        f"{s.model_id} {s.state} on {s.node} GPU {','.join(map(str, s.gpus))}"
        for s in statuses.values()
    )
    if wrong:
        figures += f"; not as planned: {', '.join(wrong)}"
    return smoke.report("FAIL" if wrong else "PASS", "deploy-as-planned", figures)


def print_standin_reports(address: str) -> None:
    """Print each stand-in's report as JSON, then leave at once.

    Run in a process of its own (`--print-standin-reports`): Serve handles keep threads that
    would reconnect a driver after `ray.shutdown()`, so this process exits without a shutdown.
    """
    import ray
    from ray import serve

    from deployer.serving.applications import model_app_name  # noqa: PLC0415

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    reports = {
        model_id: dataclasses.asdict(
            serve.get_app_handle(model_app_name(model_id)).report.remote().result()
        )
        for model_id in MODELS
    }
    print("STANDIN-REPORTS " + json.dumps(reports), flush=True)
    os._exit(0)


def standin_reports(smoke: Smoke) -> dict[str, dict[str, Any]]:
    """The stand-ins' reports, asked in a separate driver process."""
    argv = [
        sys.executable,
        "-m",
        "tests.gpu.smoke",
        "--print-standin-reports",
        "--address",
        smoke.address,
        "--out",
        str(smoke.out),
    ]
    # RAY_ADDRESS: should anything in it initialise Ray again, it joins this cluster rather than
    # starting a local one (which, in Ray 2.60, writes ~/.ray/auth_token and so switches on
    # token authentication for every `ray start` on the machine afterwards).
    env = {**os.environ, "RAY_ADDRESS": smoke.address}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("STANDIN-REPORTS "):
            reports: dict[str, dict[str, Any]] = json.loads(line.split(" ", 1)[1])
            return reports
    raise RuntimeError(f"no stand-in reports (exit {done.returncode}): {done.stderr[-1500:]}")


def check_standins(smoke: Smoke, plan: dict[str, Any]) -> None:
    """Rehearsal: what each stand-in's ranks got from Ray, against the plan."""
    reports = standin_reports(smoke)
    wrong, seen = [], []
    for placement in plan["placements"]:
        model_id = placement["model_id"]
        report = reports[model_id]
        gpus = [gpu for rank in report["ranks"] for gpu in rank["gpu_ids"]]
        rank_nodes = sorted({rank["node"] for rank in report["ranks"]})
        got = (
            report["node"],
            rank_nodes,
            gpus,
            report["gpu_memory_utilization"],
            report["vllm_ray_per_worker_gpus"],
        )
        planned = (
            placement["node"],
            [placement["node"]],
            placement["gpus"],
            placement["gpu_memory_utilization"],
            str(placement["gpu_fraction"]),
        )
        seen.append(
            f"{model_id}: Ray GPU ids {gpus} on {report['node']}, "
            f"gpu_memory_utilization {report['gpu_memory_utilization']}, "
            f"VLLM_RAY_PER_WORKER_GPUS {report['vllm_ray_per_worker_gpus']}"
        )
        if got != planned:
            wrong.append(f"{model_id} got {got}, planned {planned}")
    figures = "; ".join(seen) + (f"; differ: {'; '.join(wrong)}" if wrong else "")
    smoke.report("FAIL" if wrong else "PASS", "standin-matches-plan", figures)


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except HTTPError as exc:
        text = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError):
            return exc.code, json.loads(text)
        return exc.code, {"text": text}


def check_answers(smoke: Smoke) -> None:
    """One completion per model through the endpoint; the stand-ins answer 501, saying so."""
    figures, bad = [], []
    for model_id in MODELS:
        started = time.monotonic()
        try:
            code, answer = _post(
                f"{smoke.base_url}/v1/completions",
                {"model": model_id, "prompt": "A smoke test", "max_tokens": 8},
            )
        except (URLError, OSError) as exc:
            code, answer = 0, {"error": str(exc)}
        seconds = time.monotonic() - started
        if smoke.rehearse:
            ok = code == 501 and "stand-in" in json.dumps(answer)
            figures.append(f"{model_id} HTTP {code}")
        else:
            choices = answer.get("choices") or [{}]
            tokens = (answer.get("usage") or {}).get("completion_tokens", 0)
            ok = code == 200 and tokens > 0
            figures.append(
                f"{model_id} HTTP {code}, {tokens} tokens in {seconds:.1f} s "
                f"({choices[0].get('text', '')!r})"
            )
        if not ok:
            bad.append(f"{model_id}: HTTP {code} {json.dumps(answer)[:300]}")
    if smoke.rehearse and not bad:
        smoke.report(
            "SKIP",
            "co-located-answer",
            f"{NEEDS_GPU} (the endpoint routed both models "
            f"to their stand-ins: {', '.join(figures)})",
        )
    else:
        smoke.report(
            "FAIL" if bad else "PASS",
            "co-located-answer",
            "; ".join(figures) + (f"; failed: {'; '.join(bad)}" if bad else ""),
        )


# ------------------------------------------------------------------------------ 5, 6. memory


def _descendants(pids: set[int]) -> set[int]:
    """The processes and everything they started (engine cores, compile workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(pids), list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def engine_processes(smoke: Smoke) -> dict[str, tuple[set[int], set[int]]]:
    """Per model: its Ray actors' PIDs (the replica and the rank workers in its placement
    group) and those with their descendants."""
    from ray.util.state import list_actors

    from deployer.serving.applications import model_app_name  # noqa: PLC0415

    actors = list_actors(
        address=smoke.dashboard,
        filters=[("state", "=", "ALIVE")],
        detail=True,
        limit=10_000,
        raise_on_missing_output=False,
    )
    found = {}
    for model_id in MODELS:
        prefix = f"SERVE_REPLICA::{model_app_name(model_id)}#"
        groups = {a.placement_group_id for a in actors if (a.name or "").startswith(prefix)}
        pids = {int(a.pid) for a in actors if a.placement_group_id in groups - {None} and a.pid}
        found[model_id] = (pids, _descendants(pids))
        print(
            f"{model_id}: actors "
            + ", ".join(
                f"{a.class_name} pid {a.pid}" for a in actors if a.placement_group_id in groups
            ),
            flush=True,
        )
    return found


def vllm_reports(smoke: Smoke, actor_pids: dict[str, set[int]]) -> dict[str, VllmReport]:
    """Each engine's vLLM report, from its actors' Ray log files (child processes write there)."""
    reports = {}
    assert smoke.ray_logs is not None
    for model_id, pids in actor_pids.items():
        files = [
            f
            for pid in sorted(pids)
            for f in sorted(smoke.ray_logs.glob(f"worker-*-{pid}.*"))
            if f.suffix in (".out", ".err")
        ]
        lines = [line for f in files for line in f.read_text(errors="replace").splitlines()]
        reports[model_id] = parse_vllm_report(lines)
        print(f"{model_id}: {len(files)} log file(s) of pids {sorted(pids)}: {reports[model_id]}")
    return reports


def check_estimate(
    smoke: Smoke,
    estimate: dict[str, dict[str, Any]],
    plan: dict[str, Any],
    reports: dict[str, VllmReport],
) -> None:
    """Estimated weights and KV cache against vLLM's own figures."""
    print(
        f"{'model':<12} {'weights est':>11} {'vLLM':>6} {'KV tokens plan':>14} {'vLLM':>10} "
        f"{'KV GiB plan':>11} {'vLLM':>7} {'other in budget':>15} {'est':>5}"
    )
    bad, figures = [], []
    for placement in plan["placements"]:
        model_id = placement["model_id"]
        est, got = estimate[model_id], reports[model_id]
        kv_planned = est["kv_cache_gib_per_gpu"] + placement["extra_kv_gib"]
        budget = placement["gpu_memory_utilization"] * smoke_total_gib(plan, smoke)
        other = (
            budget - got.weights_gib - got.kv_cache_gib
            if got.weights_gib is not None and got.kv_cache_gib is not None
            else None
        )
        other_est = est["overhead_gib_per_gpu"] - CUDA_CONTEXT_GIB
        print(
            f"{model_id:<12} {est['weights_gib_per_gpu']:>11.2f} {_num(got.weights_gib):>6} "
            f"{est['kv_cache_tokens']:>14,} {_num(got.kv_cache_tokens, ',d'):>10} "
            f"{kv_planned:>11.2f} {_num(got.kv_cache_gib):>7} {_num(other):>15} "
            f"{other_est:>5.2f}"
        )
        figures.append(
            f"{model_id} weights {est['weights_gib_per_gpu']:.2f} est / "
            f"{_num(got.weights_gib)} vLLM GiB, KV {est['kv_cache_tokens']:,} planned"
            f" / {_num(got.kv_cache_tokens, ',d')} vLLM tokens"
        )
        if smoke.rehearse:
            continue
        if got.missing():
            bad.append(f"{model_id}: vLLM's log has no {', '.join(got.missing())}")
            continue
        assert got.weights_gib is not None
        assert got.kv_cache_tokens is not None
        weights = est["weights_gib_per_gpu"]
        if abs(got.weights_gib - weights) > WEIGHTS_TOLERANCE * weights + 0.05:
            bad.append(f"{model_id}: weights {got.weights_gib} GiB, estimated {weights}")
        if got.kv_cache_tokens < est["kv_cache_tokens"]:
            bad.append(f"{model_id}: KV cache {got.kv_cache_tokens} tokens < planned")
    if smoke.rehearse:
        smoke.report("SKIP", "estimate-vs-vllm", f"{NEEDS_GPU} (planned: {'; '.join(figures)})")
    else:
        smoke.report(
            "FAIL" if bad else "PASS",
            "estimate-vs-vllm",
            "; ".join(figures) + (f"; {'; '.join(bad)}" if bad else ""),
        )


def _num(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def smoke_total_gib(plan: dict[str, Any], smoke: Smoke) -> float:
    """The GPU's total memory, GiB, from the cluster file the plan was made on."""
    cluster = parse_cluster((smoke.out / "cluster-planned.yaml").read_text())
    first = plan["placements"][0]
    node = next(n for n in cluster.nodes if n.name == first["node"])
    gpu = next(g for g in node.gpus if g.index == first["gpus"][0])
    return gpu.memory_total_mib * MIB / GIB


def check_memory(
    smoke: Smoke, plan: dict[str, Any], processes: dict[str, tuple[set[int], set[int]]]
) -> None:
    """Each engine's processes' GPU memory (nvidia-smi) against its planned budget."""
    total = smoke_total_gib(plan, smoke)
    print(
        f"{'model':<12} {'planned GiB':>11} {'gpu_mem_util':>12} {'budget GiB':>10} "
        f"{'+context':>8} {'measured GiB':>12}  processes"
    )
    per_pid = (
        {}
        if smoke.rehearse
        else parse_smi_processes(nvidia_smi("--query-compute-apps=pid,used_memory"))
    )
    bad, figures = [], []
    for placement in plan["placements"]:
        model_id = placement["model_id"]
        actors, tree = processes[model_id]
        budget = placement["gpu_memory_utilization"] * total
        limit = budget + CUDA_CONTEXT_GIB * placement["tensor_parallel_size"]
        used_mib, holding = memory_of(tree, per_pid)
        measured = used_mib * MIB / GIB
        shown = "-" if smoke.rehearse else f"{measured:.2f}"
        print(
            f"{model_id:<12} {placement['gpu_memory_gib']:>11.2f} "
            f"{placement['gpu_memory_utilization']:>12.4f} {budget:>10.2f} {limit:>8.2f} "
            f"{shown:>12}  {len(actors)} actor(s), {len(tree)} process(es); on the GPU: "
            f"{holding or '-'}"
        )
        figures.append(
            f"{model_id} {shown} of {limit:.2f} GiB planned "
            f"({len(actors)} actors, {len(tree)} processes)"
        )
        if not actors:
            bad.append(f"{model_id}: no Ray actor found for its engine")
        elif not smoke.rehearse and not holding:
            bad.append(
                f"{model_id}: none of its processes {sorted(tree)} is in nvidia-smi's "
                f"list {sorted(per_pid)} (another PID namespace?)"
            )
        elif not smoke.rehearse and measured > limit + MEMORY_TOLERANCE_GIB:
            bad.append(f"{model_id}: {measured:.2f} GiB > {limit:.2f} GiB planned")
    if smoke.rehearse and not bad:
        smoke.report(
            "SKIP",
            "memory-measured-vs-planned",
            f"{NEEDS_GPU} (found the engines' processes: {'; '.join(figures)})",
        )
    else:
        smoke.report(
            "FAIL" if bad else "PASS",
            "memory-measured-vs-planned",
            "; ".join(figures) + (f"; {'; '.join(bad)}" if bad else ""),
        )


# ------------------------------------------------------------------------------ the run


def _guarded(smoke: Smoke, check: str, step: Callable[[], Any]) -> Any:
    """Run a step; an exception is that check's failure (the run goes on to clean up)."""
    try:
        return step()
    except Exception as exc:  # any error is this check's FAIL line; the run goes on to clean up
        smoke.report("FAIL", check, f"{type(exc).__name__}: {str(exc)[:1500]}")
        return None


def run(smoke: Smoke) -> int:
    """Every check, in order; the exit code."""
    _step("1. rackserve probe against nvidia-smi")
    probed = smoke.out / "cluster-probed.json"
    done = rackserve("probe", "--address", smoke.address, "--json", str(probed))
    if done.returncode != 0:
        smoke.report("FAIL", "probe-vs-nvidia-smi", f"rackserve probe exited {done.returncode}")
        return finish(smoke)
    _guarded(smoke, "probe-vs-nvidia-smi", lambda: check_probe(smoke, probed))

    _step(
        "2. two real-shape models: estimate and plan on the "
        + ("logical H200" if smoke.rehearse else "probed GPU")
    )
    models = _guarded(smoke, "plan-co-locates", lambda: models_file(smoke))
    if models is None:
        return finish(smoke)
    estimate_json = smoke.out / "estimate.json"
    rackserve("estimate", "--models", str(models), "--json", str(estimate_json))
    cluster = logical_cluster(smoke) if smoke.rehearse else probed
    (smoke.out / "cluster-planned.yaml").write_text(cluster.read_text())
    plan_json = smoke.out / "plan.json"
    done = rackserve(
        "plan", "--cluster", str(cluster), "--models", str(models), "--json", str(plan_json)
    )
    if done.returncode != 0 or not estimate_json.is_file():
        smoke.report("FAIL", "plan-co-locates", f"rackserve plan exited {done.returncode}")
        return finish(smoke)
    plan = json.loads(plan_json.read_text())
    estimate = {e["model_id"]: e for e in json.loads(estimate_json.read_text())}
    if not check_plan(smoke, plan, smoke_total_gib(plan, smoke)):
        return finish(smoke)

    _step("3. rackserve deploy of that plan" + (" (stand-in engine)" if smoke.rehearse else ""))
    deploy = [
        "deploy",
        "--models",
        str(models),
        "--address",
        smoke.address,
        "--cluster",
        str(cluster),
        "--http-host",
        "127.0.0.2",
        "--http-port",
        str(smoke.http_port),
        "--no-auth",
    ]
    if smoke.rehearse:
        deploy += ["--engine", "standin"]
    started = time.monotonic()
    try:
        done = rackserve(*deploy, timeout=DEPLOY_TIMEOUT_S)
        code = str(done.returncode)
    except subprocess.TimeoutExpired:
        code = f"timeout after {DEPLOY_TIMEOUT_S:.0f} s"
    try:
        if code != "0":
            smoke.report("FAIL", "deploy-as-planned", f"rackserve deploy: exit {code}")
            return finish(smoke)
        seconds = time.monotonic() - started
        if not _guarded(smoke, "deploy-as-planned", lambda: check_deploy(smoke, plan, seconds)):
            return finish(smoke)
        if smoke.rehearse:
            _guarded(smoke, "standin-matches-plan", lambda: check_standins(smoke, plan))

        _step("4. one completion per model")
        _guarded(smoke, "co-located-answer", lambda: check_answers(smoke))

        _step("5, 6. vLLM's memory report and nvidia-smi, per engine")
        processes = _guarded(smoke, "memory-measured-vs-planned", lambda: engine_processes(smoke))
        if processes is not None:
            actor_pids = {model_id: actors for model_id, (actors, _) in processes.items()}
            reports = vllm_reports(smoke, actor_pids)
            _guarded(
                smoke, "estimate-vs-vllm", lambda: check_estimate(smoke, estimate, plan, reports)
            )
            _guarded(
                smoke, "memory-measured-vs-planned", lambda: check_memory(smoke, plan, processes)
            )
    finally:
        rackserve("down", "--address", smoke.address)
    return finish(smoke)


def finish(smoke: Smoke) -> int:
    """The run-time check, the summary, the exit code."""
    seconds = time.monotonic() - smoke.started
    smoke.report(
        "PASS" if seconds <= TIME_LIMIT_S else "FAIL",
        "run-time",
        f"{seconds:.0f} s (limit {TIME_LIMIT_S:.0f} s)",
    )
    print(
        "== Summary" + (" (rehearsal: stand-in engine on a logical GPU)" if smoke.rehearse else "")
    )
    print("\n".join(smoke.lines), flush=True)
    return 1 if smoke.failed() else 0


def run_without_ray(smoke: Smoke) -> int:
    """Where Ray is not installed: the probe's own NVML reader against nvidia-smi, nothing else."""
    from deployer.config.cluster import Cluster, dump_cluster  # noqa: PLC0415
    from deployer.serving.nvml_reader import read_node  # noqa: PLC0415

    probed = smoke.out / "cluster-probed.json"
    probed.write_text(dump_cluster(Cluster(nodes=[read_node(NODE)])))
    check_probe(smoke, probed)
    for check in (
        "plan-co-locates",
        "deploy-as-planned",
        "co-located-answer",
        "estimate-vs-vllm",
        "memory-measured-vs-planned",
    ):
        smoke.report("SKIP", check, "needs Ray (pip install -e '.[serve,gpu]')")
    return finish(smoke)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options smoke.sh passes and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the run's files")
    parser.add_argument("--rehearse", action="store_true", help="stand-in engine, logical GPU")
    parser.add_argument("--no-ray", action="store_true", help="only the NVML reader check")
    parser.add_argument("--address", default="", help="the Ray head's GCS address")
    parser.add_argument("--dashboard", default="", help="the Ray dashboard's URL (state API)")
    parser.add_argument("--ray-logs", type=Path, help="the Ray session's logs folder")
    parser.add_argument("--http-port", type=int, default=8000, help="the endpoint's port")
    parser.add_argument("--cache", type=Path, default=None, help="where the models are built")
    parser.add_argument("--print-standin-reports", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.print_standin_reports:
        print_standin_reports(args.address)
    smoke = Smoke(
        out=args.out,
        rehearse=args.rehearse,
        address=args.address,
        dashboard=args.dashboard,
        ray_logs=args.ray_logs,
        http_port=args.http_port,
    )
    if args.cache is not None:
        smoke.cache = args.cache
    args.out.mkdir(parents=True, exist_ok=True)
    return run_without_ray(smoke) if args.no_ray else run(smoke)


if __name__ == "__main__":
    sys.exit(main())
