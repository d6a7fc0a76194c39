"""Placement benchmark: plan quality against proven optima and bounds, and plan speed.

(a) small seeded instances (up to 12 models, up to 3 nodes): how often the plan's objective
    (models placed, GPUs, nodes) equals the optimum that OR-Tools CP-SAT proves;
(b) rack scale (2,000 models, 1,000 nodes x 8 GPUs): GPUs used against a lower bound, and the
    wall time of `plan_placements`;
(c) the same instance against first-fit decreasing and against one whole GPU per rank (what Ray
    does without memory awareness);
(d) `rackserve plan` end to end (start, read the files, plan, print) on that rack's cluster and
    models files against the README's 9-GPU example, as a ratio of wall times.

Run with `nox -s bench`; the figures go in docs/7-benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from ortools.sat.python import cp_model

from deployer.config.cluster import Cluster, Gpu, Node, dump_cluster
from deployer.config.units import GIB
from deployer.planning.packing import CAPACITY, PackItem, PackNode, lower_bound
from deployer.planning.placement import Demand, Plan, packing_problem, plan_placements

H100_TOTAL_MIB = 81_559
H100_FREE_MIB = 81_000

# (weight, tensor_parallel_size, per-GPU GiB range): a mix of small chat models, 7-14B
# models, 30B-class models, 70B at tp 2/4 and 400B-class at tp 8.
MODEL_MIX = [
    (30, 1, (3.0, 12.0)),
    (30, 1, (16.0, 32.0)),
    (12, 1, (34.0, 50.0)),
    (6, 1, (55.0, 76.0)),
    (8, 2, (40.0, 75.0)),
    (8, 4, (30.0, 70.0)),
    (6, 8, (50.0, 76.0)),
]


def gpu_node(name: str, gpus: int) -> Node:
    return Node(
        name=name,
        gpus=[
            Gpu(
                index=i,
                name="NVIDIA H100 80GB HBM3",
                memory_total_mib=H100_TOTAL_MIB,
                memory_free_mib=H100_FREE_MIB,
            )
            for i in range(gpus)
        ],
    )


def random_demands(
    rng: random.Random, count: int, mix: Sequence[tuple[int, int, tuple[float, float]]] = MODEL_MIX
) -> list[Demand]:
    weights = [w for w, _, _ in mix]
    demands = []
    for i in range(count):
        _, tp, (low, high) = rng.choices(mix, weights=weights)[0]
        demands.append(
            Demand(
                model_id=f"m{i:05d}",
                tensor_parallel_size=tp,
                bytes_per_gpu=round(rng.uniform(low, high) * GIB),
            )
        )
    return demands


def objective(plan: Plan) -> tuple[int, int, int]:
    return (len(plan.unplaced), plan.gpus_used, plan.nodes_used)


# --- exact reference: OR-Tools CP-SAT ------------------------------------------------------


def cp_sat_optimum(
    nodes: Sequence[PackNode], items: Sequence[PackItem], seconds: float
) -> tuple[tuple[int, int, int], bool]:
    """The optimal (unplaced, GPUs, nodes) and whether CP-SAT proved it."""
    model = cp_model.CpModel()
    gpus = [(n, g) for n, node in enumerate(nodes) for g in range(node.gpus)]
    x = {}
    for i, item in enumerate(items):
        for n, g in gpus:
            if n in item.units:
                x[i, n, g] = model.new_bool_var(f"x{i}_{n}_{g}")
    y = {
        (i, n): model.new_bool_var(f"y{i}_{n}") for i, item in enumerate(items) for n in item.units
    }
    used = {key: model.new_bool_var(f"u{key}") for key in gpus}
    exclusive = {key: model.new_bool_var(f"e{key}") for key in gpus}
    node_used = [model.new_bool_var(f"z{n}") for n in range(len(nodes))]
    for i, item in enumerate(items):
        model.add(sum(y[i, n] for n in item.units) <= 1)
        for n in item.units:
            on_node = [x[i, n, g] for g in range(nodes[n].gpus)]
            model.add(sum(on_node) == (item.whole or 1) * y[i, n])
    for n, g in gpus:
        whole = [x[i, n, g] for i, item in enumerate(items) if item.whole and (i, n, g) in x]
        shared = [
            (x[i, n, g], item.units[n])
            for i, item in enumerate(items)
            if not item.whole and (i, n, g) in x
        ]
        model.add(sum(whole) == exclusive[n, g])
        model.add(sum(v * size for v, size in shared) <= CAPACITY * (1 - exclusive[n, g]))
        for v in whole + [v for v, _ in shared]:
            model.add_implication(v, used[n, g])
            model.add_implication(v, node_used[n])
        if g + 1 < nodes[n].gpus:  # symmetry: use a node's GPUs in order
            model.add(used[n, g] >= used[n, g + 1])
    placed = sum(y.values())
    w_nodes = 1
    w_gpus = len(nodes) + 1
    w_placed = (len(gpus) + 1) * w_gpus
    model.maximize(w_placed * placed - w_gpus * sum(used.values()) - w_nodes * sum(node_used))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = seconds
    solver.parameters.num_workers = 2
    solver.parameters.random_seed = 0
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError("CP-SAT found no solution")
    result = (
        len(items) - int(sum(solver.value(v) for v in y.values())),
        int(sum(solver.value(v) for v in used.values())),
        int(sum(solver.value(v) for v in node_used)),
    )
    return result, status == cp_model.OPTIMAL


# --- baselines --------------------------------------------------------------------------------


def first_fit_decreasing(
    nodes: Sequence[PackNode], items: Sequence[PackItem]
) -> tuple[int, int, int]:
    """Plain FFD: groups to the first node with room, shares to the first GPU with room."""
    free = [[CAPACITY] * node.gpus for node in nodes]
    empty = [[True] * node.gpus for node in nodes]
    unplaced = 0
    order = sorted(
        range(len(items)),
        key=lambda i: (-items[i].whole, -max(items[i].units.values(), default=0), i),
    )
    for i in order:
        item = items[i]
        done = False
        for n in sorted(item.units):
            if item.whole:
                slots = [g for g in range(nodes[n].gpus) if empty[n][g]][: item.whole]
                if len(slots) == item.whole:
                    for g in slots:
                        empty[n][g] = False
                        free[n][g] = 0
                    done = True
            else:
                for g in range(nodes[n].gpus):
                    if free[n][g] >= item.units[n]:
                        free[n][g] -= item.units[n]
                        empty[n][g] = False
                        done = True
                        break
            if done:
                break
        unplaced += not done
    used = [(n, g) for n in range(len(nodes)) for g in range(nodes[n].gpus) if not empty[n][g]]
    return unplaced, len(used), len({n for n, _ in used})


def whole_gpu_per_rank(
    nodes: Sequence[PackNode], items: Sequence[PackItem]
) -> tuple[int, int, int]:
    """Ray's default without memory awareness: every rank takes one whole GPU."""
    whole = [PackItem(max(1, item.whole), item.units) for item in items]
    free = [node.gpus for node in nodes]
    unplaced, used_nodes, gpus = 0, set(), 0
    for i in sorted(range(len(whole)), key=lambda i: (-whole[i].whole, i)):
        node = next((n for n in sorted(whole[i].units) if free[n] >= whole[i].whole), None)
        if node is None:
            unplaced += 1
            continue
        free[node] -= whole[i].whole
        gpus += whole[i].whole
        used_nodes.add(node)
    return unplaced, gpus, len(used_nodes)


# --- the three parts ------------------------------------------------------------------------


def small_instances(count: int, seed: int, seconds: float) -> None:
    rng = random.Random(seed)
    matches = proven = ffd_matches = 0
    misses: list[str] = []
    plan_times = []
    for k in range(count):
        nodes = [gpu_node(f"n{n}", rng.choice([1, 2, 4])) for n in range(rng.randint(1, 3))]
        cluster = Cluster(nodes=nodes)
        demands = random_demands(rng, rng.randint(3, 12), MODEL_MIX[:5])
        if rng.random() < 0.25:  # some pinned models
            demands[0] = Demand(
                demands[0].model_id,
                demands[0].tensor_parallel_size,
                demands[0].bytes_per_gpu,
                node="n0",
            )
        start = time.perf_counter()
        plan = plan_placements(cluster, demands)
        plan_times.append(time.perf_counter() - start)
        pack_nodes, items = packing_problem(cluster, demands)
        optimum, is_proven = cp_sat_optimum(pack_nodes, items, seconds)
        proven += is_proven
        ffd_matches += first_fit_decreasing(pack_nodes, items) == optimum
        if objective(plan) == optimum:
            matches += 1
        else:
            misses.append(f"instance {k}: plan {objective(plan)} vs CP-SAT {optimum}")
    print(f"(a) small instances (3-12 models, 1-3 nodes of 1/2/4 GPUs), seed {seed}")
    print(
        f"    plan equals the CP-SAT optimum: {matches}/{count} ({matches / count:.1%}); "
        f"CP-SAT proved optimality on {proven}/{count}"
    )
    print(f"    first-fit decreasing equals it: {ffd_matches}/{count} ({ffd_matches / count:.1%})")
    print(
        f"    plan time: median {statistics.median(plan_times) * 1e3:.1f} ms, "
        f"max {max(plan_times) * 1e3:.1f} ms"
    )
    for miss in misses[:10]:
        print(f"    miss: {miss}")


def rack_scale(models: int, nodes: int, seed: int, repeats: int) -> None:
    rng = random.Random(seed)
    cluster = Cluster(nodes=[gpu_node(f"gpu-{n:04d}", 8) for n in range(nodes)])
    demands = random_demands(rng, models)
    times = []
    plan = None
    for _ in range(repeats):
        start = time.perf_counter()
        plan = plan_placements(cluster, demands)
        times.append(time.perf_counter() - start)
    assert plan is not None
    pack_nodes, items = packing_problem(cluster, demands)
    bound_gpus, bound_nodes = lower_bound(pack_nodes, items)
    ffd = first_fit_decreasing(pack_nodes, items)
    whole = whole_gpu_per_rank(pack_nodes, items)
    ranks = sum(d.tensor_parallel_size for d in demands)
    print(
        f"(b) rack scale: {models} models on {nodes} nodes x 8 GPUs ({nodes * 8} GPUs), "
        f"seed {seed}; {ranks} ranks"
    )
    print(f"    {'':28} {'placed':>7} {'GPUs':>6} {'vs bound':>9} {'nodes':>6}")
    rows = [
        ("lower bound", (0, bound_gpus, bound_nodes)),
        ("rackserve plan", objective(plan)),
        ("first-fit decreasing", ffd),
        ("whole GPU per rank (Ray)", whole),
    ]
    for name, (unplaced, gpus, used_nodes) in rows:
        gap = (gpus - bound_gpus) / bound_gpus
        print(f"    {name:28} {models - unplaced:>7} {gpus:>6} {gap:>+9.2%} {used_nodes:>6}")
    print(
        f"    plan wall time: median {statistics.median(times):.3f} s, "
        f"best {min(times):.3f} s over {repeats} runs"
    )


def command_line(models: int, nodes: int, seed: int, repeats: int) -> None:
    """Wall time of `rackserve plan` on files: the rack-scale case against the README example."""
    rng = random.Random(seed)
    cluster = Cluster(nodes=[gpu_node(f"gpu-{n:04d}", 8) for n in range(nodes)])
    demands = random_demands(rng, models)
    entries = [
        {
            "model_id": d.model_id,
            "tensor_parallel_size": d.tensor_parallel_size,
            "gpu_memory_gib": round(d.bytes_per_gpu / GIB, 3),
        }
        for d in demands
    ]
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="rackserve-bench-") as tmp:
        big_cluster, big_models = Path(tmp, "cluster.yaml"), Path(tmp, "models.yaml")
        big_cluster.write_text(dump_cluster(cluster))
        big_models.write_text(yaml.safe_dump({"models": entries}, sort_keys=False))
        cases = {
            "README example (9 GPUs, 6 models)": (
                root / "examples" / "cluster.yaml",
                root / "examples" / "models.yaml",
            ),
            f"rack ({nodes * 8} GPUs, {models} models)": (big_cluster, big_models),
        }
        medians = {}
        for name, (cluster_file, models_file) in cases.items():
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                done = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "deployer",
                        "plan",
                        "-c",
                        str(cluster_file),
                        "-m",
                        str(models_file),
                    ],
                    cwd=root,
                    env={**os.environ, "HF_HUB_OFFLINE": "1"},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=False,  # exit 3 (some model does not fit) is an answer
                )
                times.append(time.perf_counter() - start)
                if done.returncode not in (0, 3):
                    raise SystemExit(f"`rackserve plan` failed on {name}: exit {done.returncode}")
            medians[name] = statistics.median(times)
    print(f"(d) `rackserve plan` end to end, median of {repeats} runs:")
    for name, seconds in medians.items():
        print(f"    {name:40} {seconds:6.2f} s")
    small, big = medians.values()
    print(f"    ratio rack / example: {big / small:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", type=int, default=200, help="small instances to solve exactly")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--cp-sat-seconds", type=float, default=10.0)
    parser.add_argument("--models", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--only", choices=["small", "rack", "command-line"], help="run one part (default: all)"
    )
    args = parser.parse_args()
    if args.only in (None, "small"):
        small_instances(args.small, args.seed, args.cp_sat_seconds)
    if args.only in (None, "rack"):
        rack_scale(args.models, args.nodes, args.seed, args.repeats)
    if args.only in (None, "command-line"):
        # A models file holds at most 1,000 models (README, "Input limits").
        command_line(min(args.models, 1000), args.nodes, args.seed, args.repeats)


if __name__ == "__main__":
    main()
