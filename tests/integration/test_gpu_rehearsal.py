"""The GPU launch path rehearsed on a real local Ray cluster with logical GPUs (no GPU needed).

`ray start --num-gpus N` makes Ray assign whole and fractional GPUs exactly as on a rack. The
cluster: a head (127.0.0.2, no GPU), `gpu-a` (127.0.0.3, 4 logical H100s) and `gpu-b`
(127.0.0.4, 8 logical A100s), described by a cluster file with chosen free memory. Checked:

- Ray's own GPU choice in the two measured cases of issue 16 (plain placement groups);
- random model sets planned and deployed through `deployer.serving.launch.deploy` with the stand-in
  engine: every engine runs on the node and GPUs the plan printed, with its environment and
  `gpu_memory_utilization`, and the engines that really share a GPU fit in its memory;
- a redeploy keeps the engines it leaves in place on their GPUs, unrestarted.

Everything up to vLLM's first CUDA call is real here; what only a GPU shows is not.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from deployer.config.cluster import NODE_LABEL, Cluster, Gpu, parse_cluster
from deployer.config.models_config import ModelConfig, ModelManager
from deployer.planning.packing import CAPACITY
from deployer.planning.placement import Plan, ray_assigns_bundle
from deployer.planning.workflow import plan_models
from deployer.serving.state import FileStateStore
from deployer.sources.estimates import estimate_models
from tests.integration import rehearsal
from tools.local_ray import HEAD_IP, WorkerSpec, free_port, start_ray_cluster, temp_root

pytestmark = [pytest.mark.integration, pytest.mark.gpu_rehearsal]

ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[serve]')")

RESERVE_GIB = 1.0
EXAMPLES = int(os.environ.get("RACKSERVE_REHEARSAL_EXAMPLES", "5"))
"""Random model sets deployed; each costs about 40 s here (down, waves, ingress). The draw is
derandomized, so CI runs the same sets each time; set more to explore further."""
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-40GB"
CLUSTER_FILE: dict[str, Any] = {
    "nodes": [
        {
            "name": "gpu-a",
            "gpus": [
                {"index": i, "name": H100, "memory_total_mib": 81559, "memory_free_mib": free}
                for i, free in enumerate([81000, 81000, 79500, 81000])
            ],
        },
        {
            "name": "gpu-b",
            "gpus": [
                {"index": i, "name": A100, "memory_total_mib": 40960, "memory_free_mib": free}
                for i, free in enumerate([40000] * 5 + [38500] + [40000] * 2)
            ],
        },
    ]
}


@dataclass(frozen=True)
class Rack:
    """The local cluster, its cluster file, and the process that deploys on it."""

    address: str
    cluster: Cluster
    port: int
    driver: ProcessPoolExecutor
    state_dir: Path
    """Deploys keep their record, events and lock here too (`--state-dir`)."""

    def down(self) -> None:
        self.driver.submit(rehearsal.down_all, self.address, str(self.state_dir)).result(
            timeout=300
        )

    def deploy(self, models: list[dict[str, Any]]) -> rehearsal.Rehearsed:
        return self.driver.submit(
            rehearsal.deploy_standin,
            models,
            json.dumps(CLUSTER_FILE),
            self.address,
            self.port,
            RESERVE_GIB,
            str(self.state_dir),
        ).result(timeout=900)


@pytest.fixture(scope="module")
def rack() -> Iterator[Rack]:
    with (
        temp_root("rs-gr-") as base,
        start_ray_cluster(
            base,
            ("head", "gpu-a"),
            # 16 logical CPUs: every engine's first bundle holds its replica's CPU
            worker_args=("--num-gpus=4", "--num-cpus=16"),
            extra_workers=[WorkerSpec("gpu-b", ("--num-gpus=8", "--num-cpus=16"))],
        ) as cluster,
        ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=rehearsal.init_process,
        ) as driver,
    ):
        port = free_port(HEAD_IP)
        rack = Rack(
            cluster.address,
            parse_cluster(json.dumps(CLUSTER_FILE)),
            port,
            driver,
            Path(base) / "state",
        )
        yield rack
        with contextlib.suppress(Exception):
            rack.down()


# --- The two measured cases of issue 16, through Ray itself ------------------------------


@contextlib.contextmanager
def ray_driver(address: str) -> Iterator[None]:
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


class _GpuReader:
    def gpus(self) -> list[int]:
        return [int(str(gpu)) for gpu in ray.get_gpu_ids()]


def gpus_ray_gives(fractions: list[float], node: str) -> list[int]:
    """Create one single-bundle placement group per fraction on `node`, in turn; the GPU of each."""
    reader = ray.remote(_GpuReader)
    groups, gpus = [], []
    try:
        for fraction in fractions:
            group = ray.util.placement_group(
                [{"GPU": fraction}], bundle_label_selector=[{NODE_LABEL: node}]
            )
            groups.append(group)
            ray.get(group.ready(), timeout=60)
            actor = reader.options(
                num_cpus=0,
                num_gpus=fraction,
                scheduling_strategy=ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=0
                ),
            ).remote()
            (gpu,) = ray.get(actor.gpus.remote(), timeout=60)
            gpus.append(gpu)
            ray.kill(actor)
    finally:
        for group in groups:
            ray.util.remove_placement_group(group)
    return gpus


def test_ray_gives_a_fraction_the_gpu_it_fits_best(rack: Rack) -> None:
    """Fractions 0.5, 0.7, 0.3 land on GPUs 0, 1, 1 (first fit would say 0, 1, 0)."""
    fractions = [0.5, 0.7, 0.3]
    with ray_driver(rack.address):
        assert gpus_ray_gives(fractions, "gpu-a") == [0, 1, 1]

    room = [CAPACITY] * 4
    replayed = [ray_assigns_bundle(room, round(f * CAPACITY)) for f in fractions]
    assert replayed == [(0,), (1,), (1,)]


def test_the_measured_plan_gets_the_gpus_it_prints(rack: Rack) -> None:
    """Six shared models on four 80 GiB GPUs: Ray gives each the GPU the plan reports.

    Before the planner replayed Ray's best fit, this plan said m3 on GPU 0; Ray put it on GPU 2.
    """
    sizes = [54.8, 33.0, 41.5, 3.5, 38.8, 37.2]
    node = {
        "name": "gpu-a",
        "gpus": [
            {"index": i, "name": H100, "memory_total_mib": 81920, "memory_free_mib": 81920}
            for i in range(4)
        ],
    }
    models = ModelManager(
        [ModelConfig(model_id=f"m{i}", gpu_memory_gib=gib) for i, gib in enumerate(sizes)]
    )
    plan = plan_models(
        parse_cluster(json.dumps({"nodes": [node]})), models, estimate_models(models), 0.0
    )
    assert not plan.unplaced
    fractions = [p.gpu_fraction for p in plan.placements]
    assert all(f is not None and f < 1 for f in fractions)

    with ray_driver(rack.address):
        given_by_ray = gpus_ray_gives([f for f in fractions if f is not None], "gpu-a")

    assert {p.model_id: p.gpus[0] for p in plan.placements} == dict(
        zip([p.model_id for p in plan.placements], given_by_ray, strict=True)
    )


# --- Random plans, deployed with the stand-in ---------------------------------------------

WHERE = [
    {},
    {},
    {"node": "gpu-a"},
    {"node": "gpu-b"},
    {"accelerator_type": "H100"},
    {"accelerator_type": "A100"},
]


@st.composite
def model_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    """2 to 4 models: mostly tensor-parallel 1 and small enough to share a GPU, some 2 and 4."""
    models = []
    for i in range(draw(st.integers(2, 4))):
        tp = draw(st.sampled_from([1, 1, 1, 2, 4]))
        tenths = draw(st.integers(20, 300) if tp == 1 else st.integers(80, 360))
        models.append(
            {
                "model_id": f"m{i}",
                "gpu_memory_gib": tenths / 10,
                "tensor_parallel_size": tp,
                **draw(st.sampled_from(WHERE)),
            }
        )
    return models


def gpu_of(cluster: Cluster, node: str, index: int) -> Gpu:
    found = cluster.node(node)
    assert found is not None, node
    return next(gpu for gpu in found.gpus if gpu.index == index)


def check_against_ray(plan: Plan, reports: dict[str, Any], cluster: Cluster) -> int:
    """Each engine runs where the plan says, with what the plan says; shared GPUs fit.

    Returns how many GPUs Ray gave to more than one engine.
    """
    assert sorted(reports) == sorted(p.model_id for p in plan.placements)
    shares: dict[tuple[str, int], float] = defaultdict(float)
    tenants: dict[tuple[str, int], int] = defaultdict(int)
    booked_mib: dict[tuple[str, int], float] = defaultdict(float)
    for p in plan.placements:
        report = reports[p.model_id]
        fraction = p.gpu_fraction
        assert fraction is not None, p
        where = f"{p.model_id}: plan {p.node} {p.gpus}, report {report}"
        assert report.node == p.node, where
        assert [r.node for r in report.ranks] == [p.node] * p.tensor_parallel_size, where
        assert all(len(r.gpu_ids) == 1 for r in report.ranks), where
        assert sorted(report.gpus) == sorted(p.gpus), where
        if p.tensor_parallel_size > 1:
            assert fraction == 1.0, where
            assert len(set(report.gpus)) == p.tensor_parallel_size, where
        assert report.tensor_parallel_size == p.tensor_parallel_size, where
        assert report.gpu_memory_utilization == p.gpu_memory_utilization, where
        assert report.vllm_ray_per_worker_gpus == str(fraction), where
        assert {r.vllm_ray_per_worker_gpus for r in report.ranks} == {str(fraction)}, where
        assert {r.cuda_visible_devices for r in report.ranks} == {None}, where  # vLLM's V2 executor
        for gpu in report.gpus:
            shares[(p.node, gpu)] += fraction
            tenants[(p.node, gpu)] += 1
            total = gpu_of(cluster, p.node, gpu).memory_total_mib
            booked_mib[(p.node, gpu)] += (p.gpu_memory_utilization or 0) * total
    for (node, gpu), share in shares.items():
        assert share <= 1 + 1e-9, f"{node} GPU {gpu} carries {share} of a GPU"
        free = gpu_of(cluster, node, gpu).memory_free_mib
        usable = free - RESERVE_GIB * 1024
        assert booked_mib[(node, gpu)] <= usable + 1, (
            f"{node} GPU {gpu}: the engines Ray put there are told {booked_mib[(node, gpu)]:.0f} "
            f"MiB in all (gpu_memory_utilization), {usable:.0f} MiB usable"
        )
    return sum(1 for count in tenants.values() if count > 1)


def test_random_plans_run_on_the_gpus_they_print(
    rack: Rack, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    rehearsed: list[int] = []
    shared: list[int] = []
    sizes: set[int] = set()
    started = time.monotonic()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each example deploys for real
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(models=model_sets())
    def rehearse(models: list[dict[str, Any]]) -> None:
        registry = ModelManager([ModelConfig.model_validate(m) for m in models])
        expected = plan_models(rack.cluster, registry, estimate_models(registry), RESERVE_GIB)
        assume(not expected.unplaced)
        rack.down()
        result = rack.deploy(models)
        assert result.plan is not None, result.output
        assert [p.as_json() for p in result.plan.placements] == [
            p.as_json() for p in expected.placements
        ]
        shared.append(check_against_ray(result.plan, result.reports, rack.cluster))
        rehearsed.append(len(result.plan.placements))
        sizes.update(p.tensor_parallel_size for p in result.plan.placements)

    rehearse()
    line = (
        f"gpu rehearsal: {len(rehearsed)} random plans ({sum(rehearsed)} engines, tensor "
        f"parallel {sorted(sizes)}, {sum(shared)} GPUs shared by several engines) deployed with "
        f"the stand-in ran on the GPUs they print, in {time.monotonic() - started:.0f} s"
    )
    request.node.user_properties.append(("plans_rehearsed", len(rehearsed)))
    with capsys.disabled():
        print(f"\n{line}")
    assert len(rehearsed) >= min(EXAMPLES, 5), line
    assert sum(shared) > 0, line


def test_deploy_refuses_a_cluster_file_ray_does_not_match(rack: Rack, tmp_path: Path) -> None:
    """Exit 2 naming each node and what to fix; nothing deployed changes."""
    h100 = {"name": H100, "memory_total_mib": 81559, "memory_free_mib": 81000}
    wrong = {
        "nodes": [
            {"name": "gpu-a", "gpus": [{"index": i, **h100} for i in range(6)]},
            {**CLUSTER_FILE["nodes"][1], "name": "gpu-c"},
        ]
    }
    (tmp_path / "cluster.json").write_text(json.dumps(wrong))
    (tmp_path / "models.json").write_text(
        json.dumps({"models": [{"model_id": "x", "gpu_memory_gib": 5.0}]})
    )
    before = rack.driver.submit(rehearsal.applications, rack.address).result(timeout=120)

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deployer",
            "deploy",
            "--engine",
            "standin",
            "--cluster",
            str(tmp_path / "cluster.json"),
            "--models",
            str(tmp_path / "models.json"),
            "--address",
            rack.address,
            "--http-host",
            HEAD_IP,
            "--http-port",
            str(rack.port),
            "--no-auth",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )

    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert "node 'gpu-a': the file lists 6 GPU(s) (indices [4, 5] among them) but Ray has 4" in (
        message
    )
    assert "--num-gpus 6" in message
    assert "node 'gpu-c': no alive Ray node has the label rackserve/node=gpu-c" in message
    assert "Traceback" not in result.stderr
    assert rack.driver.submit(rehearsal.applications, rack.address).result(timeout=120) == before


# --- Redeploys ----------------------------------------------------------------------------


def test_a_redeploy_leaves_kept_engines_on_their_gpus(rack: Rack) -> None:
    first = [
        {"model_id": "r0", "gpu_memory_gib": 30.0, "tensor_parallel_size": 2, "node": "gpu-a"},
        {"model_id": "r1", "gpu_memory_gib": 20.0, "accelerator_type": "H100"},
        {"model_id": "r2", "gpu_memory_gib": 12.0, "node": "gpu-b"},
        {"model_id": "r3", "gpu_memory_gib": 9.5, "node": "gpu-b"},
    ]
    grown = [*first, {"model_id": "r4", "gpu_memory_gib": 6.0, "node": "gpu-b"}]
    rack.down()
    before = rack.deploy(first)
    after = rack.deploy(grown)
    assert before.plan is not None
    assert after.plan is not None, after.output
    check_against_ray(after.plan, after.reports, rack.cluster)

    kept_line = re.search(r"unchanged, left running: (.*)", after.output)
    kept = kept_line.group(1).split(", ") if kept_line else []
    assert "r0" in kept, after.output  # alone on its GPUs: nothing about it changes
    for model_id in kept:
        assert after.reports[model_id] == before.reports[model_id], model_id
    placed_before = {p.model_id: p.as_json() for p in before.plan.placements}
    for p in after.plan.placements:
        if placed_before.get(p.model_id) == p.as_json():
            assert p.model_id in kept, f"{p.model_id} is placed as before but was restarted"

    # The state directory kept the same record and logged both deploys, the second as a change.
    disk = FileStateStore(rack.state_dir)
    record = disk.read()
    assert record is not None
    assert [m["model_id"] for m in record.models] == [m["model_id"] for m in grown]
    assert record.placements == [p.as_json() for p in after.plan.placements]
    events = [e for e in disk.events(last=50) if e["event"] == "deployed"]
    assert sorted(events[-1]["kept"]) == sorted(kept)
    assert "r4" in events[-1]["started"]
    assert sorted(events[-2]["started"]) == sorted(m["model_id"] for m in first)

    # The real ingress runs over the stand-ins: it lists them, and a request gets a clear refusal.
    endpoint = f"http://{HEAD_IP}:{rack.port}/v1"
    with urllib.request.urlopen(f"{endpoint}/models", timeout=30) as response:
        listed = json.load(response)
    assert sorted(m["id"] for m in listed["data"]) == ["r0", "r1", "r2", "r3", "r4"]
    chat = urllib.request.Request(
        f"{endpoint}/chat/completions",
        data=json.dumps({"model": "r4", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(chat, timeout=30)
    assert refused.value.code == 501
    assert "stand-in engine" in refused.value.read().decode()
