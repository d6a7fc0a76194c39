"""The placement planner: which node and GPUs each model gets, and what Ray and vLLM are told.

Pure: a `Cluster` and one `Demand` per model go in, a `Plan` comes out; no Ray, no NVML, no I/O.

Rules (docs/2-bootstrap-and-serve.md, "How models are placed"):
- a model's tensor-parallel ranks take whole, distinct GPUs of one node;
- a model with tensor_parallel_size 1 takes a fraction of one GPU and may share it;
- Ray sees every GPU of a node as 1.0 and chooses the GPU itself: whole bundles take the free
  GPUs of lowest index, a fractional bundle the GPU whose room fits it most tightly (best fit,
  lowest index on a tie; the raylet's `NodeResourceInstanceSet::TryAllocate`). So on each node
  GPUs are packed against the smallest usable memory among that node's GPUs (free memory less
  the reserve), any GPU Ray picks has the memory, and the plan replays Ray's rule over its launch
  order and reports Ray's choice: the tenants that really share a GPU are the ones whose
  `gpu_memory_utilization` is split from it;
- with no GPU anywhere, CPU nodes are the devices, one per node, with their usable memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from deployer.config.cluster import Cluster, Node
from deployer.config.units import GIB, MIB
from deployer.errors import ConfigError
from deployer.planning.packing import CAPACITY, ItemPlace, PackItem, PackNode, pack

DEFAULT_RESERVE_GIB = 1.0
"""Memory held back on every GPU (and CPU node) by default, for fragmentation and spikes."""


@dataclasses.dataclass(frozen=True)
class Demand:
    """What one model needs, as the planner sees it."""

    model_id: str
    tensor_parallel_size: int
    bytes_per_gpu: int
    node: str | None = None
    accelerator_type: str | None = None
    bytes_per_gpu_by_tp: Mapping[int, int] = dataclasses.field(default_factory=dict)
    kv_cache_bytes: int | None = None
    outside_budget_bytes: int = 0
    """Part of bytes_per_gpu that vLLM allocates outside gpu_memory_utilization (CUDA context)."""
    gpus: tuple[int, ...] | None = None
    """GPU indices of `node` where this model's engine already runs and stays (a redeploy)."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one model runs and what its engine is told."""

    model_id: str
    node: str
    device: Literal["gpu", "cpu"]
    gpus: tuple[int, ...]
    tensor_parallel_size: int
    gpu_memory_bytes: int
    """Footprint booked on each GPU (or on the CPU node)."""
    extra_kv_bytes: int
    """Leftover memory of its GPUs handed to this engine as extra KV cache."""
    gpu_fraction: float | None
    """Ray GPU bundle per rank (1.0 for tensor-parallel ranks); None on CPU."""
    gpu_memory_utilization: float | None
    """vLLM's fraction of each GPU's total memory for this engine; None on CPU."""
    kv_cache_memory_bytes: int | None
    """KV cache for CPU engines (vLLM's kv_cache_memory_bytes); None on GPU."""

    def as_json(self) -> dict[str, Any]:
        """The placement as `rackserve plan --json` writes it."""
        return {
            "model_id": self.model_id,
            "node": self.node,
            "device": self.device,
            "gpus": list(self.gpus),
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_gib": round(self.gpu_memory_bytes / GIB, 3),
            "extra_kv_gib": round(self.extra_kv_bytes / GIB, 3),
            "gpu_fraction": self.gpu_fraction,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "kv_cache_memory_bytes": self.kv_cache_memory_bytes,
        }


@dataclasses.dataclass(frozen=True)
class Unplaced:
    """A model that could not be placed, and why, in words a person can act on."""

    model_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class DeviceFill:
    """How full one GPU (or CPU node) is under the plan."""

    node: str
    device: Literal["gpu", "cpu"]
    index: int | None
    usable_bytes: int
    booked_bytes: int
    tenants: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Placements in launch order, the models left out, and how full each device is."""

    placements: tuple[Placement, ...]
    unplaced: tuple[Unplaced, ...]
    fills: tuple[DeviceFill, ...]
    device: Literal["gpu", "cpu"]
    proven_optimal: bool

    @property
    def gpus_used(self) -> int:
        """Devices with at least one model."""
        return sum(1 for fill in self.fills if fill.tenants)

    @property
    def nodes_used(self) -> int:
        """Nodes with at least one model."""
        return len({p.node for p in self.placements})

    def as_json(self) -> dict[str, Any]:
        """The plan as `rackserve plan --json` writes it."""
        return {
            "placements": [p.as_json() for p in self.placements],
            "unplaced": [{"model_id": u.model_id, "reason": u.reason} for u in self.unplaced],
            "summary": {
                "models_placed": len(self.placements),
                "models_unplaced": len(self.unplaced),
                "gpus_used": self.gpus_used,
                "nodes_used": self.nodes_used,
                "device": self.device,
                "proven_optimal": self.proven_optimal,
            },
        }


@dataclasses.dataclass(frozen=True)
class _Device:
    index: int | None
    total: int
    usable: int


@dataclasses.dataclass(frozen=True)
class _NodeView:
    """A node as the planner sees it: its devices and the per-device budget Ray can honour."""

    node: Node
    devices: tuple[_Device, ...]
    budget: int  # smallest usable bytes among its devices


def _node_views(cluster: Cluster, reserve: int, device: Literal["gpu", "cpu"]) -> list[_NodeView]:
    views = []
    for node in cluster.nodes:
        if device == "gpu":
            devices = tuple(
                _Device(g.index, g.memory_total_mib * MIB, g.memory_free_mib * MIB - reserve)
                for g in sorted(node.gpus, key=lambda g: g.index)
            )
        elif node.cpu_memory_mib:
            memory = node.cpu_memory_mib * MIB
            devices = (_Device(None, memory, memory - reserve),)
        else:
            devices = ()
        if devices:
            views.append(_NodeView(node, devices, max(0, min(d.usable for d in devices))))
    return views


def _devices_phrase(count: int, device: str) -> str:
    if device == "cpu":
        return "a CPU node"
    return "a GPU" if count == 1 else f"{count} GPUs of one node"


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def _matches_accelerator(node: Node, accelerator_type: str | None) -> bool:
    if accelerator_type is None:
        return True
    wanted = accelerator_type.lower().replace("nvidia", "").strip(" -_")
    return bool(node.gpus) and all(wanted in gpu.name.lower() for gpu in node.gpus)


def _eligible(
    demand: Demand, views: Sequence[_NodeView], classes: Mapping[object, list[int]], device: str
) -> dict[int, int]:
    """Nodes the demand may go on, with its size in units there.

    Nodes alike in what decides eligibility (`classes`, see `_node_classes`) are decided once.
    """
    sizes: dict[int, int] = {}
    for members in classes.values():
        view = views[members[0]]
        if demand.node is not None:
            members = [n for n in members if views[n].node.name == demand.node]  # noqa: PLW2901
            if not members:
                continue
        if device == "gpu" and not _matches_accelerator(view.node, demand.accelerator_type):
            continue
        if demand.tensor_parallel_size > len(view.devices) or view.budget <= 0:
            continue
        if demand.bytes_per_gpu > view.budget:
            continue
        size = max(1, math.ceil(demand.bytes_per_gpu * CAPACITY / view.budget))
        sizes.update(dict.fromkeys(members, size))
    return sizes


def _node_classes(views: Sequence[_NodeView]) -> dict[object, list[int]]:
    """Nodes grouped by device count, per-device budget and GPU names."""
    classes: dict[object, list[int]] = defaultdict(list)
    for n, view in enumerate(views):
        names = tuple(gpu.name for gpu in view.node.gpus)
        classes[(len(view.devices), view.budget, names)].append(n)
    return classes


def _why_no_node(demand: Demand, views: Sequence[_NodeView], device: str, reserve: int) -> str:
    """The reason a demand has no eligible node at all."""
    tp = demand.tensor_parallel_size
    candidates = [v for v in views if demand.node is None or v.node.name == demand.node]
    where = f"node {demand.node!r}" if demand.node else "the cluster"
    if device == "cpu" and tp > 1:
        return (
            f"tensor_parallel_size {tp} needs GPUs and the cluster has none; CPU nodes serve "
            "tensor_parallel_size 1"
        )
    if not candidates:
        return f"{where} has no {'GPUs' if device == 'gpu' else 'CPU memory'} to place it on"
    if device == "gpu" and demand.accelerator_type is not None:
        matching = [v for v in candidates if _matches_accelerator(v.node, demand.accelerator_type)]
        if not matching:
            names = sorted({g.name for v in candidates for g in v.node.gpus})
            return (
                f"accelerator_type {demand.accelerator_type!r} matches no GPU of {where} "
                f"(GPUs: {', '.join(names)})"
            )
        candidates = matching
    widest = max(len(v.devices) for v in candidates)
    if tp > widest:
        return (
            f"needs {tp} GPUs on one node at tensor_parallel_size {tp}; the largest node of "
            f"{where} has {widest}"
        )
    largest = max(v.budget for v in candidates)
    unit = "GPU" if device == "gpu" else "CPU node"
    reserve_note = f" after the {_gib(reserve)} reserve" if reserve else ""
    message = (
        f"needs {_gib(demand.bytes_per_gpu)} per {unit} at tensor_parallel_size {tp}; the "
        f"largest {unit} of {where} has {_gib(largest)} usable{reserve_note}"
    )
    if device == "gpu" and set(demand.bytes_per_gpu_by_tp) <= {tp}:
        return (
            f"{message}; its footprint is given by hand: raise tensor_parallel_size and lower "
            "gpu_memory_gib to match, or use larger GPUs"
        )
    if device == "gpu":
        fitting = sorted(
            size
            for size, need in demand.bytes_per_gpu_by_tp.items()
            if size > tp and need <= largest and size <= widest
        )
        if fitting:
            return f"{message}; try tensor_parallel_size {fitting[0]}"
        return (
            f"{message}; no tensor_parallel_size up to {widest} fits: use a quantized "
            "checkpoint, a smaller max_model_len or max_num_seqs, or larger GPUs"
        )
    return f"{message}; lower max_model_len or max_num_seqs, or add memory"


def _packing_problem(
    views: Sequence[_NodeView], demands: Sequence[Demand], device: str
) -> tuple[list[PackNode], list[PackItem]]:
    classes = _node_classes(views)
    items = [
        PackItem(
            whole=d.tensor_parallel_size if d.tensor_parallel_size > 1 else 0,
            units=_eligible(d, views, classes, device),
        )
        for d in demands
    ]
    return [PackNode(len(v.devices)) for v in views], items


def packing_problem(
    cluster: Cluster, demands: Sequence[Demand], reserve_gib: float = DEFAULT_RESERVE_GIB
) -> tuple[list[PackNode], list[PackItem]]:
    """The abstract packing problem `plan_placements` solves (for benchmarks and solvers)."""
    device: Literal["gpu", "cpu"] = "gpu" if cluster.has_gpus else "cpu"
    views = _node_views(cluster, round(reserve_gib * GIB), device)
    return _packing_problem(views, demands, device)


def _check_pins(demands: Sequence[Demand], cluster: Cluster) -> None:
    names = [node.name for node in cluster.nodes]
    problems = [
        f"models[{i}] (id {d.model_id!r}): node {d.node!r} is not in the cluster "
        f"(nodes: {', '.join(names)})"
        for i, d in enumerate(demands)
        if d.node is not None and d.node not in names
    ]
    if problems:
        raise ConfigError(problems, source="models config")


def plan_placements(
    cluster: Cluster, demands: Sequence[Demand], reserve_gib: float = DEFAULT_RESERVE_GIB
) -> Plan:
    """Place every model it can: most models, then fewest GPUs, then fewest nodes.

    Deterministic: the same cluster and demands give the same plan. Raises ConfigError when a
    model is pinned to a node the cluster does not have.
    """
    if reserve_gib < 0:
        raise ConfigError(f"the memory reserved per GPU must be 0 GiB or more (got {reserve_gib})")
    _check_pins(demands, cluster)
    device: Literal["gpu", "cpu"] = "gpu" if cluster.has_gpus else "cpu"
    reserve = round(reserve_gib * GIB)
    views = _node_views(cluster, reserve, device)
    nodes, items = _packing_problem(views, demands, device)
    eligible = [item.units for item in items]
    packing = pack(nodes, items)

    unplaced = []
    for demand, sizes, place in zip(demands, eligible, packing.places, strict=True):
        if place is None:
            reason = (
                _why_no_node(demand, views, device, reserve)
                if not sizes
                else f"no room left for {_gib(demand.bytes_per_gpu)} on "
                f"{_devices_phrase(demand.tensor_parallel_size, device)} once the other models "
                "are placed (the plan places as many models as it can); add memory or GPUs, or "
                "remove a model"
            )
            unplaced.append(Unplaced(demand.model_id, reason))

    # Who is on which device, in launch order (see the module docstring). Engines that already
    # run hold their bundles: they come first, on their own GPUs.
    launch = sorted(
        (i for i, p in enumerate(packing.places) if p is not None),
        key=lambda i: (not demands[i].gpus, *_launch_key(i, packing.places, items, demands)),
    )
    places, no_gpu = _as_ray_assigns(launch, packing.places, items, demands, views)
    for i in no_gpu:
        node = views[packing.places[i].node].node.name  # type: ignore[union-attr]
        unplaced.append(Unplaced(demands[i].model_id, _NO_GPU_LEFT.format(node)))
    launch = [i for i in launch if i in places]
    tenants: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in launch:
        for slot in places[i].slots:
            tenants[(places[i].node, slot)].append(i)
    placements = []
    for i in launch:
        place = places[i]
        sharing = [[demands[j] for j in tenants[(place.node, slot)]] for slot in place.slots]
        placements.append(_placement(demands[i], views[place.node], sharing, place.slots, device))
    fills = tuple(
        DeviceFill(
            node=view.node.name,
            device=device,
            index=dev.index,
            usable_bytes=max(0, dev.usable),
            booked_bytes=sum(demands[i].bytes_per_gpu for i in tenants.get((n, slot), [])),
            tenants=tuple(demands[i].model_id for i in tenants.get((n, slot), [])),
        )
        for n, view in enumerate(views)
        for slot, dev in enumerate(view.devices)
    )
    return Plan(tuple(placements), tuple(unplaced), fills, device, packing.proven_optimal)


_NO_GPU_LEFT = (
    "Ray would find no GPU of node {!r} with room for it beside the engines that keep running "
    "on their GPUs; run `rackserve down` and deploy again to repack the node"
)


def ray_assigns_bundle(room: list[int], units: int) -> tuple[int, ...] | None:
    """The GPUs Ray's raylet gives one bundle of `units` (CAPACITY per GPU), taken from `room`.

    `room[k]` is what GPU k has left, in units. Ray 2.60 (`NodeResourceInstanceSet::TryAllocate`):
    a demand of one GPU or more takes that many wholly free GPUs, lowest index first; a fraction
    takes the GPU it fits most tightly (least room left after it), the lowest index on a tie.
    None when no GPU can take it; `room` is then unchanged.
    """
    if units >= CAPACITY:
        free = [k for k, left in enumerate(room) if left == CAPACITY][: units // CAPACITY]
        if len(free) < units // CAPACITY:
            return None
        for k in free:
            room[k] = 0
        return tuple(free)
    fitting = [(left - units, k) for k, left in enumerate(room) if left >= units]
    if not fitting:
        return None
    _, best = min(fitting)
    room[best] -= units
    return (best,)


def _as_ray_assigns(
    launch: Sequence[int],
    planned: Sequence[ItemPlace | None],
    items: Sequence[PackItem],
    demands: Sequence[Demand],
    views: Sequence[_NodeView],
) -> tuple[dict[int, ItemPlace], list[int]]:
    """The GPUs Ray gives each placement when its bundles are created in launch order.

    Engines that already run (`Demand.gpus`) hold their GPUs. Every other engine's bundles go
    through Ray's rule (`ray_assigns_bundle`); launched node by node, group by group, best fit
    never needs more GPUs than the packing's groups (a group's items fit on the first fresh GPU
    it opens, and that GPU is tighter than any other fresh one), and since fractions are sized
    against the node's tightest GPU, any GPU Ray picks has the memory. Returns the places Ray
    chooses and the engines it would find no room for (possible only beside engines that keep
    their GPUs).
    """
    room: dict[int, list[int]] = {}
    result: dict[int, ItemPlace] = {}
    no_gpu: list[int] = []
    for i in launch:
        place = planned[i]
        assert place is not None
        free = room.setdefault(place.node, [CAPACITY] * len(views[place.node].devices))
        kept = [
            k
            for k, dev in enumerate(views[place.node].devices)
            if dev.index in (demands[i].gpus or ())
        ]
        if kept and len(kept) == len(demands[i].gpus or ()):
            units = CAPACITY if items[i].whole else items[i].units[place.node]
            for k in kept:
                free[k] -= min(units, free[k])
            result[i] = ItemPlace(place.node, tuple(kept))
            continue
        # One bundle per rank, each on one GPU: whole GPUs for tensor-parallel ranks.
        bundles = [CAPACITY] * items[i].whole or [items[i].units[place.node]]
        taken: list[int] = []
        for units in bundles:
            got = ray_assigns_bundle(free, units)
            if got is None:
                break
            taken.extend(got)
        if len(taken) < len(bundles):
            for k, units in zip(taken, bundles, strict=False):  # Ray creates no part of a group
                free[k] += units
            no_gpu.append(i)
            continue
        result[i] = ItemPlace(place.node, tuple(taken))
    return result, no_gpu


def _launch_key(
    index: int,
    places: Sequence[Any],
    items: Sequence[PackItem],
    demands: Sequence[Demand],
) -> tuple[int, int, int, int, int]:
    """Per node: whole-GPU groups first, then shared GPUs in slot order, largest tenant first."""
    place = places[index]
    whole = 0 if items[index].whole else 1
    return (place.node, whole, place.slots[0], -demands[index].bytes_per_gpu, index)


def _placement(
    demand: Demand,
    view: _NodeView,
    sharing: Sequence[Sequence[Demand]],
    slots: tuple[int, ...],
    device: Literal["gpu", "cpu"],
) -> Placement:
    """The placement of one model on `slots` of a node; `sharing[k]` are the tenants of slot k."""
    devices = [view.devices[slot] for slot in slots]
    if device == "cpu":
        return Placement(
            model_id=demand.model_id,
            node=view.node.name,
            device="cpu",
            gpus=(),
            tensor_parallel_size=demand.tensor_parallel_size,
            gpu_memory_bytes=demand.bytes_per_gpu,
            extra_kv_bytes=0,
            gpu_fraction=None,
            gpu_memory_utilization=None,
            kv_cache_memory_bytes=demand.kv_cache_bytes,
        )
    # Leftover usable memory of each GPU goes to its tenants in proportion to their footprint;
    # an engine gets the same on every rank, so the tightest of its GPUs decides.
    extra = min(
        _leftover_share(demand, dev, tenants) for dev, tenants in zip(devices, sharing, strict=True)
    )
    total = min(dev.total for dev in devices)
    granted = demand.bytes_per_gpu + extra - demand.outside_budget_bytes
    if demand.tensor_parallel_size > 1:
        fraction = 1.0
    else:
        fraction = min(1.0, math.ceil(demand.bytes_per_gpu * CAPACITY / view.budget) / CAPACITY)
    return Placement(
        model_id=demand.model_id,
        node=view.node.name,
        device="gpu",
        gpus=tuple(dev.index for dev in devices if dev.index is not None),
        tensor_parallel_size=demand.tensor_parallel_size,
        gpu_memory_bytes=demand.bytes_per_gpu,
        extra_kv_bytes=extra,
        gpu_fraction=fraction,
        gpu_memory_utilization=math.floor(granted * CAPACITY / total) / CAPACITY,
        kv_cache_memory_bytes=None,
    )


def _leftover_share(demand: Demand, dev: _Device, sharing: Sequence[Demand]) -> int:
    """The demand's share of the device's usable memory that no tenant booked."""
    booked = sum(d.bytes_per_gpu for d in sharing)
    if booked == 0:
        return 0
    return max(0, dev.usable - booked) * demand.bytes_per_gpu // booked
