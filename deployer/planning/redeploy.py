"""Re-planning against what runs: pure, no Ray.

A redeploy must not move what it keeps. Models that run unchanged stay on their node and on the
GPUs Ray gave them; the planner sees the memory our own engines hold as free (it placed them),
and only engines whose launch description changes are restarted. Keeping an engine's GPUs can
change its neighbours' share of a GPU, and so their description: re-planning repeats until the
set of engines kept in place is stable (it only shrinks, so this ends).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from deployer.config.cluster import Cluster, Gpu, Node
from deployer.config.models_config import ModelManager
from deployer.config.units import GIB, MIB
from deployer.planning.estimate import MemoryEstimate
from deployer.planning.packing import CAPACITY
from deployer.planning.placement import Demand, Plan, Unplaced, ray_assigns_bundle
from deployer.planning.serve_config import EngineSpec, engine_specs
from deployer.planning.workflow import plan_models


@dataclasses.dataclass(frozen=True)
class Deployed:
    """What rackserve deployed last: the models (as given), the placements, each engine's config."""

    models: list[dict[str, Any]]
    placements: list[dict[str, Any]]
    engines: dict[str, dict[str, Any]]
    engine: str = "vllm"
    """What ran the models: `vllm`, or the rehearsal stand-in."""
    ingress: str = ""
    """What the ingress was built from (`applications.ingress_key`): unchanged, it is kept."""
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The deploy's own settings (`http_host`, `http_port`, `reserve_gib`), for a redeploy."""
    drained: list[str] = dataclasses.field(default_factory=list)
    """Nodes taken out of service (`rackserve drain`): every plan leaves them empty."""

    def to_bytes(self) -> bytes:
        """JSON, for the state store."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str).encode()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> Deployed | None:
        """Read back what `to_bytes` wrote; None for nothing."""
        if not data:
            return None
        document = json.loads(data)
        return cls(
            models=document["models"],
            placements=document["placements"],
            engines=document.get("engines", {}),
            engine=document.get("engine", "vllm"),
            ingress=document.get("ingress", ""),
            settings=document.get("settings", {}),
            drained=document.get("drained", []),
        )

    def same_as(self, models: list[dict[str, Any]], engine: str) -> bool:
        """True when deploying `models` with `engine` would change nothing."""
        return self.models == models and self.engine == engine

    def unplaced(self) -> list[str]:
        """The models asked for that the last plan left without a place (no room, node lost)."""
        placed = {p["model_id"] for p in self.placements}
        return [m["model_id"] for m in self.models if m["model_id"] not in placed]


@dataclasses.dataclass(frozen=True)
class Redeploy:
    """A plan against what runs, and what it changes: engines to stop, start, and leave be."""

    plan: Plan
    specs: list[EngineSpec]
    start: list[EngineSpec]
    """Engines to start, in launch order: new ones and changed ones (after they are stopped)."""
    stop: list[str]
    """Engines to stop first: removed, unplaced or changed."""
    keep: list[str]
    """Engines left running as they are, on the same node and GPUs."""
    make_before_break: list[str] = dataclasses.field(default_factory=list)
    """Running engines restarted or moved whose new engine starts first, beside the old one,
    which stops once the new one serves (there is room for both)."""
    downtime: list[str] = dataclasses.field(default_factory=list)
    """Running engines restarted or moved that must stop before their new engine starts: no
    room for both at once."""


def models_document(models: ModelManager) -> list[dict[str, Any]]:
    """The models as `Deployed.models` records them."""
    return [m.model_dump(mode="json") for m in models]


def with_own_memory_freed(cluster: Cluster, deployed: Deployed | None) -> Cluster:
    """The cluster as if rackserve's running engines were not there.

    Re-planning against memory that our own engines hold would move them; adding their booked
    memory back makes the planner see what it saw when it placed them.
    """
    if deployed is None:
        return cluster
    held: dict[tuple[str, int | None], int] = {}
    for p in deployed.placements:
        booked = round((p["gpu_memory_gib"] + p.get("extra_kv_gib", 0.0)) * 1024) * MIB
        for index in p["gpus"] or [None]:
            key = (p["node"], index)
            held[key] = held.get(key, 0) + booked
    nodes = []
    for node in cluster.nodes:
        gpus = [
            Gpu.model_validate(
                gpu.model_dump()
                | {
                    "memory_free_mib": min(
                        gpu.memory_total_mib,
                        gpu.memory_free_mib + held.get((node.name, gpu.index), 0) // MIB,
                    )
                }
            )
            for gpu in node.gpus
        ]
        cpu = node.cpu_memory_mib
        if cpu is not None and not node.gpus:
            cpu += held.get((node.name, None), 0) // MIB
        nodes.append(Node.model_validate(node.model_dump() | {"gpus": gpus, "cpu_memory_mib": cpu}))
    return Cluster(nodes=nodes)


def keep_on_their_nodes(
    models: ModelManager, deployed: Deployed | None, lost: Collection[str] = ()
) -> ModelManager:
    """Pin each model that is deployed unchanged to the node it runs on, unless that is lost."""
    if deployed is None:
        return models
    before = {m["model_id"]: m for m in deployed.models}
    nodes = {p["model_id"]: p["node"] for p in deployed.placements if p["node"] not in lost}
    kept = ModelManager()
    for model in models:
        same = before.get(model.model_id) == model.model_dump(mode="json")
        if same and model.node is None and model.model_id in nodes:
            model = model.model_copy(update={"node": nodes[model.model_id]})  # noqa: PLW2901
        kept.add(model)
    return kept


def plan_keeping_running(
    cluster: Cluster,
    models: ModelManager,
    estimates: Sequence[MemoryEstimate],
    reserve_gib: float,
    kept_gpus: Mapping[str, tuple[int, ...]],
) -> Plan:
    """`plan_models`, except that no engine kept where it runs is left out to make room.

    The planner places as many models as it can, whichever they are: after a node loss with
    too little room, it could stop a healthy engine on a surviving node to place a model of the
    lost one. When that happens, the other models are admitted one at a time, in their order,
    each only if it leaves out no more kept engines than planning those alone; the rest are
    unplaced, saying why.
    """
    plan = plan_models(cluster, models, estimates, reserve_gib, kept_gpus=kept_gpus)
    if not any(u.model_id in kept_gpus for u in plan.unplaced):
        return plan
    pairs = list(zip(models, estimates, strict=True))

    def plan_of(chosen: list[int]) -> Plan:
        subset = ModelManager([pairs[i][0] for i in chosen])
        return plan_models(
            cluster, subset, [pairs[i][1] for i in chosen], reserve_gib, kept_gpus=kept_gpus
        )

    def kept_left_out(candidate: Plan) -> int:
        return sum(u.model_id in kept_gpus for u in candidate.unplaced)

    admitted = [i for i, (m, _) in enumerate(pairs) if m.model_id in kept_gpus]
    plan = plan_of(admitted)
    floor = kept_left_out(plan)
    for i, (model, _) in enumerate(pairs):
        if model.model_id in kept_gpus:
            continue
        trial = plan_of(sorted([*admitted, i]))
        if kept_left_out(trial) <= floor:
            admitted, plan = sorted([*admitted, i]), trial
    left_out = [m.model_id for i, (m, _) in enumerate(pairs) if i not in admitted]
    reason = "no room left without stopping an engine that runs on a node still up"
    return dataclasses.replace(
        plan, unplaced=(*plan.unplaced, *(Unplaced(m, reason) for m in left_out))
    )


def replan(
    cluster: Cluster,
    models: ModelManager,
    estimates: Sequence[MemoryEstimate],
    deployed: Deployed | None,
    running: Collection[str],
    reserve_gib: float,
    *,
    engine: str = "vllm",
    memory_counts_ours: bool = True,
    lost: Collection[str] = (),
    drained: Collection[str] = (),
    rebalance: bool = False,
) -> Redeploy:
    """Plan `models` onto `cluster` keeping in place every engine in `running` that stays as is.

    `deployed` is what was deployed last (None: nothing) and `running` the engines of it that
    Serve still runs. An engine is kept when its launch description (node, GPUs, memory, engine
    arguments) comes out the same and `engine` is what runs it; kept engines hold the GPUs Ray
    gave them. `memory_counts_ours` says whether the cluster's free memory was measured with our
    engines running (a probe) or not (a cluster file, whose figures never move). Engines on
    `lost` nodes are stopped and placed again elsewhere (a model pinned there stays unplaced).
    `drained` nodes get no engine: theirs move elsewhere, make-before-break where there is room
    (as do restarted engines): see `Redeploy.make_before_break`. `rebalance` plans every model
    afresh, as on an empty cluster: an engine whose place comes out the same is kept, the others
    move.
    """
    cluster = Cluster(nodes=[n for n in cluster.nodes if n.name not in drained])
    replace_all = deployed is not None and deployed.engine != engine
    was_running = sorted(running)
    node_of = {p["model_id"]: p["node"] for p in (deployed.placements if deployed else [])}
    on_lost = {m for m in running if node_of.get(m) in lost}
    running = [m for m in running if m not in on_lost]
    if deployed is None or replace_all:
        running = []
    out = {*lost, *drained}
    stranded = {m.model_id: m.node for m in models if m.node is not None and m.node in out}
    if stranded:  # pinned by their config to a lost node: unplaced until it is back
        kept_estimates = [
            e for m, e in zip(models, estimates, strict=True) if m.model_id not in stranded
        ]
        models = ModelManager([m for m in models if m.model_id not in stranded])
        estimates = kept_estimates
    pinned = models if rebalance else keep_on_their_nodes(models, deployed, out)
    freed = with_own_memory_freed(cluster, deployed) if memory_counts_ours else cluster
    before: Mapping[str, Mapping[str, Any]] = deployed.engines if deployed else {}
    wanted = {m.model_id for m in models}
    in_place = {
        p["model_id"]: tuple(p["gpus"])
        for p in (deployed.placements if deployed else [])
        if p["gpus"]
        and p["model_id"] in running
        and p["model_id"] in wanted
        and p["node"] not in drained
        and not rebalance
    }
    on_gpus = set(in_place)  # running on GPUs: kept only where they run
    while True:
        plan = plan_keeping_running(freed, pinned, estimates, reserve_gib, in_place)
        specs = engine_specs(plan, models, cluster)
        changed = {
            s.model_id
            for s in specs
            if s.model_id not in running or before.get(s.model_id) != s.llm_config
        } | {  # the same description on other GPUs: Ray would leave it where it runs
            p.model_id
            for p in plan.placements
            if p.model_id in on_gpus and p.gpus != in_place.get(p.model_id)
        }
        moving = changed & set(in_place)
        if not moving:
            break
        in_place = {m: gpus for m, gpus in in_place.items() if m not in moving}
    if stranded:
        plan = dataclasses.replace(
            plan,
            unplaced=(
                *plan.unplaced,
                *(Unplaced(m, _stranded_reason(n, n in drained)) for m, n in stranded.items()),
            ),
        )
    placed = {s.model_id for s in specs}
    if replace_all:  # another engine runs the models: every running one is replaced
        return Redeploy(
            plan=plan,
            specs=specs,
            start=specs,
            stop=was_running,
            keep=[],
            downtime=sorted(set(was_running) & placed),
        )
    moved = sorted(set(running) & changed & placed)
    both = _make_before_break(
        Planning(freed, pinned, estimates, reserve_gib, in_place),
        [p for p in (deployed.placements if deployed else []) if p["model_id"] in moved],
        (plan, changed, running, before),
        models,
        cluster,
    )
    if both is not None:
        plan, specs = both
    overlap = set(moved) if both is not None else set()
    stop = sorted(((set(running) & set(before)) - (placed - changed)) | on_lost)
    return Redeploy(
        plan=plan,
        specs=specs,
        start=[s for s in specs if s.model_id in changed],
        stop=[m for m in stop if m not in overlap],
        keep=[s.model_id for s in specs if s.model_id not in changed],
        make_before_break=sorted(overlap),
        downtime=[m for m in moved if m not in overlap],
    )


def _stranded_reason(node: str, drained: bool) -> str:
    if drained:
        return f"pinned to node {node!r}, which is drained; undrain it or change the model's node"
    return f"pinned to node {node!r}, which is lost; placed again when it is back"


@dataclasses.dataclass(frozen=True)
class Planning:
    """What `plan_keeping_running` was given: the cluster, the models and the engines kept."""

    cluster: Cluster
    models: ModelManager
    estimates: Sequence[MemoryEstimate]
    reserve_gib: float
    kept_gpus: Mapping[str, tuple[int, ...]]


HOLDER = " (stopping)"
"""Marks an old engine that holds its place in a make-before-break plan."""


def _make_before_break(
    planning: Planning,
    old: Sequence[Mapping[str, Any]],
    planned: tuple[Plan, set[str], Collection[str], Mapping[str, Mapping[str, Any]]],
    models: ModelManager,
    cluster: Cluster,
) -> tuple[Plan, list[EngineSpec]] | None:
    """The plan with the moving engines' old places still held, if it changes nothing else.

    `old`: the moving engines' placements as deployed. An old engine on a node left out of the
    plan (drained) holds nothing the plan uses. Otherwise the models are planned again beside
    the old engines, held where they are (as Ray will see them while the new ones start): the
    result is used only if it places the same models, restarts the same engines and leaves
    every kept engine's description as it was. None: no room for both; stop first.
    """
    plan, changed, running, before = planned
    names = {n.name for n in cluster.nodes}
    held = [p for p in old if p["node"] in names]
    if not held or fits_beside(plan, changed, held, cluster):
        return plan, engine_specs(plan, models, cluster)
    holders = [
        Demand(
            model_id=p["model_id"] + HOLDER,
            tensor_parallel_size=p["tensor_parallel_size"],
            # its booking, not its extra KV cache: the GPU's leftover is then split as before
            bytes_per_gpu=round(p["gpu_memory_gib"] * GIB),
            node=p["node"],
            gpus=tuple(p["gpus"]) or None,
        )
        for p in held
    ]
    trial = plan_models(
        planning.cluster,
        planning.models,
        planning.estimates,
        planning.reserve_gib,
        kept_gpus=planning.kept_gpus,
        holders=holders,
    )
    where = {p.model_id: p for p in trial.placements}
    if any(h.model_id not in where or where[h.model_id].gpus != (h.gpus or ()) for h in holders):
        return None
    ours = {h.model_id for h in holders}
    trial = without_holders(trial, {h.model_id: h.bytes_per_gpu for h in holders})
    if {p.model_id for p in trial.placements} != {p.model_id for p in plan.placements}:
        return None
    specs = engine_specs(trial, models, cluster)
    restarted = {s.model_id for s in specs if s.model_id not in running}
    restarted |= {s.model_id for s in specs if before.get(s.model_id) != s.llm_config}
    kept_moved = any(
        p.model_id in planning.kept_gpus and p.gpus != planning.kept_gpus[p.model_id]
        for p in trial.placements
    )
    if not restarted <= changed or kept_moved or ours & restarted:
        return None
    return trial, specs


def fits_beside(
    plan: Plan, started: Collection[str], held: Sequence[Mapping[str, Any]], cluster: Cluster
) -> bool:
    """True when the engines `started` can start as `plan` places them while `held` still run.

    `held`: old engines' placements (as recorded). A new engine takes no GPU an old one holds
    (its share of a GPU's leftover memory assumes the GPU's other tenants are the plan's), and
    on a CPU node the old engines' memory fits beside the plan's; replaying Ray's GPU choice
    (`ray_assigns_bundle`) with the old engines' bundles still held gives the planned GPUs.
    """
    holding = {(p["node"], gpu) for p in held for gpu in p["gpus"]}
    fills = {(f.node, f.index): f for f in plan.fills}
    for p in plan.placements:
        if p.model_id not in started:
            continue
        if p.device == "cpu":
            beside = sum(round(h["gpu_memory_gib"] * GIB) for h in held if h["node"] == p.node)
            fill = fills[(p.node, None)]
            if beside and fill.booked_bytes + beside > fill.usable_bytes:
                return False
        elif any((p.node, gpu) in holding for gpu in p.gpus):
            return False
    if plan.device == "cpu":
        return True
    nodes = {n.name: n for n in cluster.nodes}
    room = {name: [CAPACITY] * len(node.gpus) for name, node in nodes.items()}
    position = {name: {g.index: k for k, g in enumerate(node.gpus)} for name, node in nodes.items()}

    def units(fraction: float | None, tensor_parallel: int) -> int:
        return CAPACITY if tensor_parallel > 1 else round((fraction or 1.0) * CAPACITY)

    holders = [
        (h["node"], h["gpus"], units(h["gpu_fraction"], h["tensor_parallel_size"])) for h in held
    ]
    kept = [
        (p.node, p.gpus, units(p.gpu_fraction, p.tensor_parallel_size))
        for p in plan.placements
        if p.model_id not in started
    ]
    for node, gpus, size in [*holders, *kept]:
        for gpu in gpus:
            k = position[node][gpu]
            room[node][k] -= min(size, room[node][k])
    for p in plan.placements:  # in launch order
        if p.model_id not in started:
            continue
        size = units(p.gpu_fraction, p.tensor_parallel_size)
        taken: list[int] = []
        for _ in range(p.tensor_parallel_size if size == CAPACITY else 1):
            got = ray_assigns_bundle(room[p.node], size)
            if got is None:
                return False
            taken.extend(got)
        if sorted(nodes[p.node].gpus[k].index for k in taken) != sorted(p.gpus):
            return False
    return True


def without_holders(plan: Plan, holders: Mapping[str, int]) -> Plan:
    """`plan` less the holders (by model id, with the bytes each booked per GPU)."""
    fills = tuple(
        dataclasses.replace(
            fill,
            tenants=tuple(t for t in fill.tenants if t not in holders),
            booked_bytes=fill.booked_bytes - sum(holders.get(t, 0) for t in fill.tenants),
        )
        for fill in plan.fills
    )
    return dataclasses.replace(
        plan,
        placements=tuple(p for p in plan.placements if p.model_id not in holders),
        unplaced=tuple(u for u in plan.unplaced if u.model_id not in holders),
        fills=fills,
    )
