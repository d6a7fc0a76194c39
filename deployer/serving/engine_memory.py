"""Each engine's measured memory: NVML per process on GPU nodes, resident memory on CPU nodes.

An engine's processes are its ALIVE replica actors (`SERVE_REPLICA::<application>#engine#<id>`),
every other ALIVE actor in their placement groups (vLLM's tensor-parallel workers under Ray
Serve LLM) and all their descendants (vLLM's engine core). The actors come from the GCS actor
table, which answers without the dashboard that `ray.util.state` needs (local clusters and
`ray_head_dashboard_enabled: false` run none). On each node one Ray task, pinned to it and
asking for no CPU, reads those processes (`read_process_memory`). NVML numbers the GPUs as the
probe does, so its indices are the plan's (not CUDA_VISIBLE_DEVICES's).

Ray is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from deployer.planning.drift import Drift, drift
from deployer.serving.applications import ENGINE_DEPLOYMENT, app_model
from deployer.serving.nvml_reader import Nvml, load_pynvml
from deployer.serving.probe import connect
from deployer.serving.replicas import REPLICA_PREFIX
from deployer.serving.state import deployed_store

READ_TIMEOUT_S = 20.0
"""How long the driver waits for the nodes' readings; a node later than that is unmeasured."""


@dataclasses.dataclass(frozen=True)
class ProcessMemory:
    """What a set of processes and their descendants hold on one node."""

    rss_bytes: int
    """Resident memory not shared with other processes."""
    gpu_bytes: dict[int, int]
    """Per NVML GPU index; empty without NVML, and a device NVML cannot tell about left out."""


@dataclasses.dataclass(frozen=True)
class ActorRow:
    """An ALIVE actor as the GCS lists it."""

    name: str
    pid: int
    node_id: str
    placement_group_id: str
    """Hex; empty when the actor is in no placement group."""


def _psutil() -> Any:
    """The psutil module (a Ray dependency): untyped, and absent where the types are checked."""
    return importlib.import_module("psutil")


def process_tree(pids: Iterable[int]) -> set[int]:
    """`pids` and all their descendants that are alive and visible; gone ones left out."""
    psutil = _psutil()
    found: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            found.update(int(p.pid) for p in [root, *root.children(recursive=True)])
        except psutil.Error:  # gone, or not ours to see
            continue
    return found


def _private(pids: Iterable[int]) -> int:
    """Resident memory not shared with other processes: RSS less shared pages (Linux).

    As Ray's own per-process USS figure: libraries such as torch, mapped by every process of an
    engine, would otherwise count once per process.
    """
    psutil = _psutil()
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):  # exited since the tree was read
            memory = psutil.Process(pid).memory_info()
            total += int(memory.rss) - int(getattr(memory, "shared", 0))
    return total


def _gpu_bytes(pids: Collection[int], nvml: Nvml | None) -> dict[int, int]:
    """Device memory of `pids` per NVML index; empty when NVML is missing or fails."""
    if nvml is None:
        try:
            nvml = load_pynvml()
        except ImportError:
            return {}
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return {}
    try:
        used: dict[int, int] = {}
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            ours = [
                p.usedGpuMemory
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if p.pid in pids
            ]
            known = [figure for figure in ours if figure is not None]
            if len(known) == len(ours):
                used[index] = sum(known)
        return used
    except nvml.NVMLError:
        return {}
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


def read_process_memory(pids: Iterable[int], nvml: Nvml | None = None) -> ProcessMemory:
    """What `pids` and their descendants hold here: resident memory, and per GPU what NVML says.

    `nvml`: the `pynvml` module (the default) or a stand-in with its functions.
    """
    tree = process_tree(pids)
    return ProcessMemory(rss_bytes=_private(tree), gpu_bytes=_gpu_bytes(tree, nvml))


def read_engines(pids: Mapping[str, Sequence[int]]) -> dict[str, ProcessMemory]:
    """The Ray task on one node: `read_process_memory` of each model's processes there."""
    return {model_id: read_process_memory(model_pids) for model_id, model_pids in pids.items()}


def _engine_app(name: str) -> str | None:
    """The application of an engine replica's actor name; None for any other actor."""
    if not name.startswith(REPLICA_PREFIX):
        return None
    app, _, deployment = name.removeprefix(REPLICA_PREFIX).rpartition("#")[0].rpartition("#")
    return app if deployment == ENGINE_DEPLOYMENT and app else None


def engine_pids(
    actors: Sequence[ActorRow], model_ids: Iterable[str]
) -> dict[str, dict[str, set[int]]]:
    """Per model, per Ray node id: the PIDs of its replicas and of their placement groups."""
    wanted = set(model_ids)
    found: dict[str, dict[str, set[int]]] = {}
    groups: dict[str, str] = {}
    for actor in actors:
        owner = app_model(_engine_app(actor.name) or "")
        model_id = owner[0] if owner and owner[0] in wanted else None
        if model_id is None or not actor.pid:
            continue
        found.setdefault(model_id, {}).setdefault(actor.node_id, set()).add(actor.pid)
        if actor.placement_group_id:
            groups[actor.placement_group_id] = model_id
    for actor in actors:
        model_id = groups.get(actor.placement_group_id) if actor.placement_group_id else None
        if model_id is not None and actor.pid:
            found[model_id].setdefault(actor.node_id, set()).add(actor.pid)
    return found


def usage_of(
    engines: Mapping[str, Mapping[str, Collection[int]]],
    readings: Mapping[str, Mapping[str, ProcessMemory]],
) -> dict[str, dict[int | None, int]]:
    """The measured usage per model as `drift` takes it, from each node's readings.

    A model with a node that gave no reading is left out (unmeasured), not undercounted.
    """
    usage: dict[str, dict[int | None, int]] = {}
    for model_id, nodes in engines.items():
        parts = [readings.get(node_id, {}).get(model_id) for node_id in nodes]
        measured = [part for part in parts if part is not None]
        if not measured or len(measured) < len(parts):
            continue
        figures: dict[int | None, int] = {None: sum(part.rss_bytes for part in measured)}
        for part in measured:
            for index, used in part.gpu_bytes.items():
                figures[index] = figures.get(index, 0) + used
        usage[model_id] = figures
    return usage


def alive_actors() -> list[ActorRow]:
    """The connected cluster's ALIVE actors, from the GCS actor table."""
    from ray._private import state
    from ray.core.generated import gcs_pb2

    accessor = state.state._connect_and_get_accessor()
    rows = []
    for record in accessor.get_actor_table(None, "ALIVE"):
        actor = gcs_pb2.ActorTableData.FromString(record)  # type: ignore[attr-defined]
        group = bytes(actor.placement_group_id)
        rows.append(
            ActorRow(
                name=str(actor.name),
                pid=int(actor.pid),
                node_id=bytes(actor.address.node_id).hex(),
                placement_group_id=group.hex() if group.strip(b"\xff") else "",  # nil: all ff
            )
        )
    return rows


def engine_usage(
    model_ids: Iterable[str], timeout_s: float = READ_TIMEOUT_S
) -> dict[str, dict[int | None, int]]:
    """The memory each model's running engine holds in the connected cluster (`usage_of`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    engines = engine_pids(alive_actors(), model_ids)
    node_table = ray.nodes()  # type: ignore[no-untyped-call]
    alive = {row["NodeID"] for row in node_table if row.get("Alive")}
    by_node: dict[str, dict[str, list[int]]] = {}
    for model_id, nodes in engines.items():
        for node_id, pids in nodes.items():
            if node_id in alive:  # a task pinned to a dead node would only time out
                by_node.setdefault(node_id, {})[model_id] = sorted(pids)
    if not by_node:
        return {}
    task = ray.remote(read_engines)
    refs = {
        node_id: task.options(
            num_cpus=0,
            max_retries=0,
            name="rackserve-engine-memory",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(pids)
        for node_id, pids in by_node.items()
    }
    ready, late = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    for ref in late:
        ray.cancel(ref, force=True)
    readings: dict[str, dict[str, ProcessMemory]] = {}
    for node_id, ref in refs.items():
        if ref in ready:
            with contextlib.suppress(ray.exceptions.RayError):  # that node stays unmeasured
                readings[node_id] = ray.get(ref)
    return usage_of(engines, readings)


def memory_drift(address: str, state_dir: Path | None = None) -> list[Drift]:
    """`drift` of each deployed model at `address`; [] when nothing is deployed or Ray is away.

    Whatever fails while measuring leaves the models unmeasured: `status` shows it and goes on.
    """
    import ray

    try:
        connect(address)
    except Exception:  # status has reported the cluster already; the figures are extra
        return []
    try:
        deployed = deployed_store(state_dir).read()
        if deployed is None:
            return []
        try:
            usage = engine_usage([p["model_id"] for p in deployed.placements])
        except Exception:  # the GCS table or a node task failed: unmeasured, not an error
            usage = {}
        return drift(deployed.placements, usage)
    except Exception:  # the record could not be read this time
        return []
    finally:
        ray.shutdown()
