"""Serving overhead: rackserve's endpoint against a hand-written Ray Serve LLM app and `vllm serve`.

On this machine, in one run, for two random-weight Llama models built locally (`tiny`: hidden
128, 2 layers; `small`: hidden 1024, 12 layers, about 150 M parameters), each served three ways
with the same engine settings (one OpenMP thread, batch size, KV cache, eager mode), each running
vLLM's executor as it does by default (rackserve: the model in the engine core; the others: in a
worker process beside it; the variants `rackserve,mp` and `vllm,uni` swap that):

- `rackserve`: `rackserve deploy` on a fresh one-node Ray cluster (rackserve's ingress, one
  engine application);
- `hand`: a hand-written `build_openai_app` script on a fresh one-node cluster (Serve LLM's own
  ingress);
- `vllm`: plain `vllm serve`, after Ray is stopped.

Ray runs on one node, as a model's host on a rack does (the head's processes and the engine);
plain vLLM runs on the same host alone. Measured for each: (1) latency at concurrency 1 of a
1-token and a 128-token completion, streamed and not (median and p99); (2) completion tokens/s at
concurrency 1, 8 and 32, the median of `--rounds` rounds with their spread; (3) the CPU seconds
each process group used while the concurrency-8 rounds ran, and (3b) at rest (from /proc); with
`--profile`, (4) where the Ray Serve processes spend their CPU, sampled by py-spy; and, for the
`VARIANTS` named in `--servers`, (5) each candidate setting against rackserve's defaults. The
client keeps its HTTP connections alive, as an OpenAI SDK does. Run with
`nox -s bench_serving`; the figures go in docs/7-benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.local_ray import HEAD_IP, start_ray_cluster, temp_root
from tools.quickstart import DEFAULT_CACHE, deploy_args

PORT = 8000
MAX_NUM_SEQS = 32
KV_CACHE_BYTES = 256 * 1024**2
SIZES: dict[str, dict[str, int]] = {
    "tiny": {},  # tools.tiny_models.TINY_LLAMA: about 0.8 M parameters
    "small": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 12,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
    },
}
ENGINE_KWARGS: dict[str, Any] = {
    "max_model_len": 512,
    "max_num_seqs": MAX_NUM_SEQS,
    "dtype": "bfloat16",
    "enforce_eager": True,
    "kv_cache_memory_bytes": KV_CACHE_BYTES,
}
ENGINE_ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
"""Every engine's threads: one OpenMP thread (what Ray gives an engine holding one CPU)."""

HAND_WRITTEN = """
import json, sys
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app
import ray

address, port, model_id, source, kwargs, env = sys.argv[1:7]
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.2", "port": int(port)})
config = LLMConfig(
    model_loading_config={"model_id": model_id, "model_source": source},
    accelerator_config={"kind": "cpu"},
    placement_group_config={"bundles": [{"CPU": 1}], "strategy": "STRICT_PACK"},
    deployment_config={"placement_group_bundle_label_selector": [{"rackserve/node": "head"}],
                       "ray_actor_options": {"num_cpus": 0}},
    runtime_env={"env_vars": json.loads(env)},
    engine_kwargs=json.loads(kwargs),
)
app = build_openai_app({"llm_configs": [config],
                        "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}})
serve.run(app, name="hand", route_prefix="/")
"""

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


# -- the client ------------------------------------------------------------------------------


class Client:
    """OpenAI completions over HTTP/1.1, one kept-alive connection per thread (or none)."""

    def __init__(self, model: str, keep_alive: bool = True) -> None:
        self.model = model
        self.keep_alive = keep_alive
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None or not self.keep_alive:
            connection = http.client.HTTPConnection(HEAD_IP, PORT, timeout=300)
            self._local.connection = connection
        return connection

    def complete(self, tokens: int, stream: bool = False) -> int:
        """One completion of exactly `tokens` tokens; returns the tokens the server counted."""
        body = {"model": self.model, "prompt": "def main(", "max_tokens": tokens,
                "ignore_eos": True, "temperature": 0.0, "stream": stream}  # fmt: skip
        if stream:
            body["stream_options"] = {"include_usage": True}
        headers = {"Content-Type": "application/json"}
        if not self.keep_alive:
            headers["Connection"] = "close"
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            connection = self._connection()
            try:
                connection.request("POST", "/v1/completions", json.dumps(body), headers)
                response = connection.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, ConnectionError):
                connection.close()
                self._local.connection = None
                if attempt == 2:
                    raise
        if not self.keep_alive:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        if not stream:
            return int(json.loads(data)["usage"]["completion_tokens"])
        usage = 0
        for line in data.decode().splitlines():
            if line.startswith("data: {"):
                event = json.loads(line.removeprefix("data: "))
                if event.get("usage"):
                    usage = int(event["usage"]["completion_tokens"])
        return usage


def wait_answering(
    client: Client, timeout_s: float, server: subprocess.Popen[bytes] | None
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}; see its log")
        try:
            client.complete(1)
            return
        except (OSError, RuntimeError, http.client.HTTPException, json.JSONDecodeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# -- what is measured ------------------------------------------------------------------------


@dataclass
class Figures:
    """One server's measurements for one model."""

    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    tok_s: dict[int, list[float]] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    idle_cpu: dict[str, float] = field(default_factory=dict)
    tokens_in_cpu_window: int = 0
    deploy_s: float = 0.0
    threads: str = ""
    profile: dict[str, list[tuple[str, float]]] = field(default_factory=dict)


LATENCY_CASES = {"1 token": (1, False), "1 token, streamed": (1, True),
                 "128 tokens": (128, False), "128 tokens, streamed": (128, True)}  # fmt: skip


def latencies(client: Client, repeats: dict[int, int]) -> dict[str, list[float]]:
    """Milliseconds per request at concurrency 1, for each LATENCY_CASES entry."""
    found: dict[str, list[float]] = {}
    for case, (tokens, stream) in LATENCY_CASES.items():
        client.complete(tokens, stream)  # warm
        times = []
        for _ in range(repeats[tokens]):
            start = time.perf_counter()
            client.complete(tokens, stream)
            times.append((time.perf_counter() - start) * 1000)
        found[case] = times
    return found


def tokens_per_s(client: Client, concurrency: int, requests: int, tokens: int) -> float:
    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        produced = sum(pool.map(lambda _: client.complete(tokens), range(requests)))
        return produced / (time.perf_counter() - start)


# -- CPU per process group, from /proc -------------------------------------------------------

GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("engine core (vLLM)", ("EngineCore",)),
    ("engine worker (vLLM, mp executor)", ("VLLM::Worker",)),
    (
        "engine replica (Serve LLM server)",
        ("ServeReplica:rackserve-model", "LLMServer", "ServeReplica:hand:LLM"),
    ),
    ("ingress replica", ("Ingress", "ServeReplica:rackserve")),
    ("HTTP proxy", ("ProxyActor",)),
    ("Serve controller", ("ServeController",)),
    ("vllm serve API server", ("vllm serve", "VLLM_SERVE", "vllm.entrypoints")),
    ("raylet", ("raylet/raylet",)),
    ("GCS", ("gcs_server",)),
    ("Ray agents (dashboard agent, runtime env, logs)", ("ray/dashboard", "ray/_private")),
    ("other Ray workers", ("ray::",)),
]
TICKS = os.sysconf("SC_CLK_TCK")


def _label(cmdline: str) -> str | None:
    for label, needles in GROUPS:
        if any(needle in cmdline for needle in needles):
            return label
    return None


def cpu_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (group, user+system ticks) of every process in a GROUP."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        label = _label(cmdline)
        if label is not None:
            found[int(entry.name)] = (label, int(fields[11]) + int(fields[12]))
    return found


def cpu_between(
    before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]
) -> dict[str, float]:
    used: dict[str, float] = defaultdict(float)
    for pid, (label, ticks) in after.items():
        used[label] += (ticks - before.get(pid, (label, 0))[1]) / TICKS
    return dict(used)


def engine_threads() -> str:
    """OMP_NUM_THREADS and the thread count of each running vLLM engine core, as it runs."""
    found = []
    for pid, (label, _) in cpu_ticks().items():
        if label != "engine core (vLLM)":
            continue
        with contextlib.suppress(OSError):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            omp = next((e.decode().split("=", 1)[1] for e in environ
                        if e.startswith(b"OMP_NUM_THREADS=")), "unset")  # fmt: skip
            status = Path(f"/proc/{pid}/status").read_text()
            threads = next(line.split()[1] for line in status.splitlines()
                           if line.startswith("Threads:"))  # fmt: skip
            found.append(f"OMP_NUM_THREADS={omp}, {threads} threads")
    return "; ".join(found) or "no engine core found"


def serve_pids() -> dict[str, int]:
    """The Ray Serve processes py-spy samples: proxy, ingress and engine replica."""
    pids = {}
    for pid, (label, _) in cpu_ticks().items():
        if label in {"HTTP proxy", "ingress replica", "engine replica (Serve LLM server)",
                     "vllm serve API server"}:  # fmt: skip
            pids.setdefault(label, pid)
    return pids


def profile(client: Client, args: argparse.Namespace) -> dict[str, list[tuple[str, float]]]:
    """py-spy samples of each Serve process for `--profile-s` of concurrency-8 load:
    the functions holding most samples (their own time), as shares of the samples taken."""
    pids = serve_pids()
    out = Path(tempfile.mkdtemp(prefix="rs-pyspy-"))
    spies = {
        label: subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(args.profile_s),
                "--rate",
                "100",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(out / f"{pid}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for label, pid in pids.items()
    }
    deadline = time.monotonic() + args.profile_s
    while time.monotonic() < deadline:
        tokens_per_s(client, 8, 16, 32)
    found = {}
    for label, spy in spies.items():
        spy.wait(60)
        raw = out / f"{pids[label]}.txt"
        leaves: Counter[str] = Counter()
        if raw.exists():
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                leaves[_frame(stack.split(";")[-1])] += int(count)
        total = sum(leaves.values()) or 1
        found[label] = [(frame, n / total) for frame, n in leaves.most_common(6)]
    return found


def _frame(frame: str) -> str:
    """`function (path/to/file.py:line)` as `function (package/file.py)`."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if parts else path
    return f"{name} ({short})"


def measure(client: Client, args: argparse.Namespace, figures: Figures) -> None:
    repeats = {1: args.short_repeats, 128: args.long_repeats}
    figures.threads = engine_threads()
    before = cpu_ticks()
    time.sleep(args.idle_s)  # at rest: what Ray and Serve cost with no request at all
    figures.idle_cpu = {k: v / args.idle_s for k, v in cpu_between(before, cpu_ticks()).items()}
    figures.latency_ms = latencies(client, repeats)
    for concurrency in args.concurrency:
        requests = max(args.requests, concurrency * 2)
        tokens_per_s(client, concurrency, concurrency, args.tokens)  # warm the batch size
        rounds = []
        for _ in range(args.rounds):
            if concurrency == 8:
                before = cpu_ticks()
            rounds.append(tokens_per_s(client, concurrency, requests, args.tokens))
            if concurrency == 8:
                for label, used in cpu_between(before, cpu_ticks()).items():
                    figures.cpu_s[label] = figures.cpu_s.get(label, 0.0) + used
                figures.tokens_in_cpu_window += requests * args.tokens
        figures.tok_s[concurrency] = rounds
    if args.profile:
        figures.profile = profile(client, args)


# -- the three servers -----------------------------------------------------------------------


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; on failure, raise with the end of what it printed."""
    done = subprocess.run(
        argv, check=False, text=True, stdin=subprocess.DEVNULL, capture_output=True, **kwargs
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


@contextlib.contextmanager
def rackserve_server(
    model: str,
    source: Path,
    cache: Path,
    ray_env: dict[str, str] | None = None,
    engine_kwargs: dict[str, Any] | None = None,
) -> Iterator[float]:
    models = {"models": [{"model_id": model, "model_source": str(source), "node": "head",
                          "max_model_len": ENGINE_KWARGS["max_model_len"],
                          "max_num_seqs": MAX_NUM_SEQS, "dtype": "bfloat16",
                          "overhead_gib": 1.0, "engine_kwargs": {
                              "enforce_eager": True, "kv_cache_memory_bytes": KV_CACHE_BYTES,
                              **(engine_kwargs or {})}}]}  # fmt: skip
    path = cache / "bench-models.json"
    path.write_text(json.dumps(models))
    env = {**os.environ, **ENGINE_ENV}
    with (
        temp_root("rs-bench-") as base,
        start_ray_cluster(base, head_env=ray_env, head_only=True) as cluster,
    ):
        start = time.monotonic()
        run([sys.executable, "-m", "deployer", *deploy_args(path, cluster.address, PORT)],
            env=env)  # fmt: skip
        wait_answering(Client(model), 600, None)
        yield time.monotonic() - start


@contextlib.contextmanager
def hand_server(model: str, source: Path, cache: Path) -> Iterator[float]:
    del cache
    with temp_root("rs-bench-") as base, start_ray_cluster(base, head_only=True) as cluster:
        start = time.monotonic()
        run([sys.executable, "-c", HAND_WRITTEN, cluster.address, str(PORT), model, str(source),
             json.dumps(ENGINE_KWARGS), json.dumps(ENGINE_ENV)])  # fmt: skip
        wait_answering(Client(model), 600, None)
        yield time.monotonic() - start


@contextlib.contextmanager
def vllm_server(
    model: str, source: Path, cache: Path, extra_env: dict[str, str] | None = None
) -> Iterator[float]:
    env = dict(os.environ, **ENGINE_ENV, **(extra_env or {}))
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in ENGINE_KWARGS.items()
             if name != "enforce_eager"]  # fmt: skip
    with (cache / "vllm-serve.log").open("w") as log:
        start = time.monotonic()
        server = subprocess.Popen(
            [sys.executable, "-c", VLLM_SERVE, str(source), "--served-model-name", model,
             "--host", HEAD_IP, "--port", str(PORT), "--enforce-eager", *flags],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            wait_answering(Client(model), 600, server)
            yield time.monotonic() - start
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)


SERVERS: dict[str, Callable[[str, Path, Path], contextlib.AbstractContextManager[float]]] = {
    "rackserve": rackserve_server,
    "hand": hand_server,
    "vllm": vllm_server,
}


@dataclass(frozen=True)
class Variant:
    """One setting changed from a server's defaults, run beside that server (`--servers NAME`)."""

    what: str
    server: str = "rackserve"
    env: dict[str, str] = field(default_factory=dict)
    """rackserve: Ray's processes' environment; vllm: `vllm serve`'s."""
    keep_alive: bool = True
    """Whether the client keeps its connections alive."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """rackserve: added to the model's engine_kwargs."""


VARIANTS: dict[str, Variant] = {
    "rackserve,mp": Variant(
        "Serve LLM's own CPU engine: vLLM's `mp` executor, the model in a worker process beside "
        "the engine core (rackserve's default before; `distributed_executor_backend: mp`)",
        engine_kwargs={"distributed_executor_backend": "mp"},
    ),
    "vllm,uni": Variant(
        "plain `vllm serve` with the model run in its engine core, as rackserve runs CPU engines "
        "(`VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps vLLM's `uni` executor)",
        server="vllm",
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    ),
    "rackserve+throughput": Variant(
        "Serve's throughput-optimized mode, HTTP proxy kept: gRPC between replicas, user code "
        "on the replica's own loop, buffered request logs, GC frozen after start",
        env={"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
    ),
    "rackserve+stream10ms": Variant(
        "Serve LLM's stream batching interval at 10 ms instead of 50 ms",
        env={"RAYLLM_MODEL_RESPONSE_BATCH_TIMEOUT_MS": "10"},
    ),
    "rackserve,close": Variant(
        "rackserve's defaults, the client opening a connection per request (no keep-alive)",
        keep_alive=False,
    ),
}
"""Candidate settings, each run with `--servers NAME` beside the server it changes."""


def start_server(
    name: str, model: str, source: Path, args: argparse.Namespace
) -> tuple[contextlib.AbstractContextManager[float], bool]:
    """A server by name (`SERVERS` or `VARIANTS`), and whether its client keeps connections."""
    if name in VARIANTS:
        variant = VARIANTS[name]
        if variant.server == "vllm":
            return vllm_server(model, source, args.cache, variant.env), variant.keep_alive
        server = rackserve_server(model, source, args.cache, variant.env, variant.engine_kwargs)
        return server, variant.keep_alive
    return SERVERS[name](model, source, args.cache), not args.no_keep_alive


# -- the tables ------------------------------------------------------------------------------


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def report(results: dict[str, dict[str, Figures]], args: argparse.Namespace) -> None:
    for size, by_server in results.items():
        print(f"\n== {size} model ({args.rounds} rounds per figure; spread = (max-min)/median)")
        counts = f"{args.short_repeats} requests of 1 token, {args.long_repeats} of 128"
        print(f"(1) latency at concurrency 1, ms: median / p99 ({counts})")
        print(f"    {'server':<10}" + "".join(f"{case:>24}" for case in LATENCY_CASES))
        for server, figures in by_server.items():
            cells = [f"{statistics.median(v):9.1f} / {_p99(v):8.1f}" for v in
                     figures.latency_ms.values()]  # fmt: skip
            print(f"    {server:<10}" + "".join(f"{c:>24}" for c in cells))
        if "vllm" in by_server:
            base = by_server["vllm"].latency_ms
            for server, figures in by_server.items():
                if server == "vllm":
                    continue
                added = [statistics.median(v) - statistics.median(base[case])
                         for case, v in figures.latency_ms.items()]  # fmt: skip
                print(f"    {server + ' +':<10}" + "".join(f"{a:>+21.1f} ms" for a in added))
        print(f"(2) completion tokens/s ({args.tokens}-token completions): median (spread)")
        print(f"    {'server':<10}" + "".join(f"{'conc ' + str(c):>18}" for c in args.concurrency))
        for server, figures in by_server.items():
            cells = [f"{statistics.median(v):8.0f} ({_spread(v):4.0%})" for v in
                     figures.tok_s.values()]  # fmt: skip
            print(f"    {server:<10}" + "".join(f"{c:>18}" for c in cells))
        if "vllm" in by_server:
            for server, figures in by_server.items():
                if server == "vllm":
                    continue
                plain = by_server["vllm"].tok_s
                ratios = [
                    statistics.median(figures.tok_s[c]) / statistics.median(plain[c])
                    for c in args.concurrency
                ]
                print(f"    {server + '/vllm':<10}" + "".join(f"{r:>18.2f}" for r in ratios))
        print("(3) CPU seconds per process group during the concurrency-8 rounds, per 1,000 tokens")
        labels = [label for label, _ in GROUPS]
        print(f"    {'group':<48}" + "".join(f"{s:>12}" for s in by_server))
        for label in labels:
            cells = [f.cpu_s.get(label, 0.0) * 1000 / max(f.tokens_in_cpu_window, 1)
                     for f in by_server.values()]  # fmt: skip
            if any(cells):
                print(f"    {label:<48}" + "".join(f"{c:>12.3f}" for c in cells))
        totals = [sum(f.cpu_s.values()) * 1000 / max(f.tokens_in_cpu_window, 1)
                  for f in by_server.values()]  # fmt: skip
        print(f"    {'all':<48}" + "".join(f"{t:>12.3f}" for t in totals))
        print(f"(3b) CPU at rest ({args.idle_s:.0f} s, no requests), % of one core")
        for label in labels:
            cells = [f.idle_cpu.get(label, 0.0) * 100 for f in by_server.values()]
            if any(cells):
                print(f"    {label:<48}" + "".join(f"{c:>11.1f}%" for c in cells))
        rest = [sum(f.idle_cpu.values()) * 100 for f in by_server.values()]
        print(f"    {'all':<48}" + "".join(f"{t:>11.1f}%" for t in rest))
        for server, figures in by_server.items():
            print(f"    {server} engine core: {figures.threads}")
        print("    time to answer after start: " + ", ".join(
            f"{s} {f.deploy_s:.1f} s" for s, f in by_server.items()))  # fmt: skip
        tried = [n for n in by_server if n in VARIANTS and VARIANTS[n].server in by_server]
        if tried:
            print("(5) settings tried, against the server's defaults in the same run")
            for name in tried:
                base = by_server[VARIANTS[name].server]
                med = statistics.median
                tok_s, ms = by_server[name].tok_s, by_server[name].latency_ms
                ratios = ", ".join(
                    f"conc {c} x{med(tok_s[c]) / med(base.tok_s[c]):.2f}" for c in args.concurrency
                )
                latency = ", ".join(
                    f"{case} {med(v) - med(base.latency_ms[case]):+.1f} ms"
                    for case, v in ms.items()
                )
                print(f"    {name}: {VARIANTS[name].what}")
                print(f"      tokens/s {ratios}; latency {latency}")
        for server, figures in by_server.items():
            for label, frames in figures.profile.items():
                print(f"(4) {server}: {label}, py-spy, share of samples (own time)")
                for frame, share in frames:
                    print(f"      {share:5.1%}  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument(
        "--servers", nargs="+", default=list(SERVERS), choices=[*SERVERS, *VARIANTS]
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16, help="per round (at least 2x conc)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--short-repeats", type=int, default=40)
    parser.add_argument("--long-repeats", type=int, default=10)
    parser.add_argument("--idle-s", type=float, default=20.0, help="the at-rest CPU window")
    parser.add_argument("--no-keep-alive", action="store_true")
    parser.add_argument("--profile", action="store_true", help="py-spy the Serve processes")
    parser.add_argument("--profile-s", type=int, default=15)
    args = parser.parse_args()

    from tools.tiny_models import build_tiny_model  # noqa: PLC0415 - needs torch

    results: dict[str, dict[str, Figures]] = {}
    for size in args.sizes:
        source = build_tiny_model(args.cache / "models" / f"bench-{size}", seed=7, **SIZES[size])
        model = f"bench-{size}"
        results[size] = {}
        for server in args.servers:
            figures = Figures()
            started, keep_alive = start_server(server, model, source, args)
            with started as deploy_s:
                figures.deploy_s = deploy_s
                measure(Client(model, keep_alive=keep_alive), args, figures)
            results[size][server] = figures
            print(f"measured {size} through {server}", flush=True)
    report(results, args)


if __name__ == "__main__":
    main()
