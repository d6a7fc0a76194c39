"""The combinatorial heart of the planner: packing items onto the GPUs of nodes.

Pure and integer-only. A node has `gpus` identical slots of `CAPACITY` units each (Ray's
resource granularity is 1/10,000 of a GPU). An item either takes `whole` empty GPUs of one node
(a tensor-parallel group) or `units` of one GPU that it may share with other items. Items list
the nodes they may go on, with their size in units there.

Objective, lexicographic: most items placed, then fewest GPUs used, then fewest nodes used.

`pack` runs a best-fit-decreasing construction (with buckets so that it stays fast at rack
scale), a pass that empties the least-filled shared GPUs into the others, and, for instances
small enough, an exact branch and bound that starts from that solution and proves it optimal
or improves it. The search is bounded by a node count, not a clock, so the plan is
deterministic.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

CAPACITY = 10_000
"""Units in one GPU: Ray accounts fractional GPUs in steps of 0.0001."""

EXACT_MAX_ITEMS = 16
"""Instances with at most this many items get the exact search."""

EXACT_NODE_BUDGET = 300_000
"""Search nodes the exact search may expand before it settles for the best found."""


@dataclasses.dataclass(frozen=True)
class PackNode:
    """A node with `gpus` empty GPU slots."""

    gpus: int


@dataclasses.dataclass(frozen=True)
class PackItem:
    """Something to place: `whole` GPUs (>= 1) of one node, or `units` of one GPU (whole == 0).

    `units` maps each node the item may go on to its size there (ignored when whole > 0,
    where the mapping's keys are the eligible nodes).
    """

    whole: int
    units: Mapping[int, int]

    @functools.cached_property
    def smallest(self) -> int:
        """Its smallest size in units on any eligible node (0 if it has none)."""
        return min(self.units.values(), default=0)


@dataclasses.dataclass(frozen=True)
class ItemPlace:
    """Where an item went: a node and GPU slots on it (slot numbers are per node, from 0)."""

    node: int
    slots: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Packing:
    """A solution: one place (or None) per item, and its objective."""

    places: tuple[ItemPlace | None, ...]
    gpus_used: int
    nodes_used: int
    proven_optimal: bool

    @property
    def unplaced(self) -> int:
        """Items with no place."""
        return sum(place is None for place in self.places)

    @property
    def objective(self) -> tuple[int, int, int]:
        """(unplaced, GPUs, nodes): smaller is better, compared in this order."""
        return (self.unplaced, self.gpus_used, self.nodes_used)


class _State:
    """Mutable packing state for the constructive heuristics."""

    def __init__(self, nodes: Sequence[PackNode]) -> None:
        self.nodes = nodes
        self.free_whole = [node.gpus for node in nodes]
        self.next_slot = [0] * len(nodes)
        # Open shared GPUs: (node, slot) -> remaining units and the items on it.
        self.remaining: dict[tuple[int, int], int] = {}
        self.tenants: dict[tuple[int, int], list[int]] = defaultdict(list)
        # Open shared GPUs sorted by remaining units, for best fit.
        self.open_sorted: list[tuple[int, int, int]] = []
        # Nodes bucketed by free whole GPUs, for best-fit node choice.
        self.buckets: dict[int, list[int]] = defaultdict(list)
        for index, node in enumerate(nodes):
            self.buckets[node.gpus].append(index)
        self.places: list[ItemPlace | None] = []

    def _move_bucket(self, node: int, before: int, after: int) -> None:
        bucket = self.buckets[before]
        del bucket[bisect.bisect_left(bucket, node)]
        bisect.insort(self.buckets[after], node)
        self.free_whole[node] = after

    def _take_slot(self, node: int) -> int:
        slot = self.next_slot[node]
        self.next_slot[node] += 1
        self._move_bucket(node, self.free_whole[node], self.free_whole[node] - 1)
        return slot

    def best_node(self, need: int, eligible: Mapping[int, int] | None) -> int | None:
        """The eligible node with the fewest free whole GPUs that still has `need` of them."""
        for count in sorted(c for c in self.buckets if c >= need and self.buckets[c]):
            for node in self.buckets[count]:
                if eligible is None or node in eligible:
                    return node
        return None

    def place_whole(self, node: int, whole: int) -> ItemPlace:
        """Take `whole` empty GPUs of a node."""
        slots = []
        for _ in range(whole):
            slots.append(self.next_slot[node])
            self.next_slot[node] += 1
        self._move_bucket(node, self.free_whole[node], self.free_whole[node] - whole)
        return ItemPlace(node, tuple(slots))

    def best_open(
        self, item: PackItem, exclude: tuple[int, int] | None = None
    ) -> tuple[int, int] | None:
        """The open shared GPU that the item fills most tightly, if any has room."""
        best: tuple[int, int, int] | None = None
        sizes = sorted(set(item.units.values()))
        for size in sizes:
            start = bisect.bisect_left(self.open_sorted, (size, -1, -1))
            for remaining, node, slot in self.open_sorted[start:]:
                if best is not None and remaining - size >= best[0]:
                    break
                if item.units.get(node) == size and (node, slot) != exclude:
                    best = (remaining - size, node, slot)
                    break
        return None if best is None else (best[1], best[2])

    def add_shared(self, key: tuple[int, int], units: int, item: int) -> None:
        """Put an item of `units` on an open (or newly opened) shared GPU."""
        if key in self.remaining:
            entry = (self.remaining[key], *key)
            del self.open_sorted[bisect.bisect_left(self.open_sorted, entry)]
        else:
            self.remaining[key] = CAPACITY
        self.remaining[key] -= units
        self.tenants[key].append(item)
        bisect.insort(self.open_sorted, (self.remaining[key], *key))

    def remove_shared(self, key: tuple[int, int], units: int, item: int) -> None:
        """Take an item off a shared GPU (the GPU stays open)."""
        entry = (self.remaining[key], *key)
        del self.open_sorted[bisect.bisect_left(self.open_sorted, entry)]
        self.remaining[key] += units
        self.tenants[key].remove(item)
        bisect.insort(self.open_sorted, (self.remaining[key], *key))

    def close_shared(self, key: tuple[int, int]) -> None:
        """Close an empty shared GPU and give its slot back to the node."""
        entry = (self.remaining.pop(key), *key)
        del self.open_sorted[bisect.bisect_left(self.open_sorted, entry)]
        del self.tenants[key]
        node = key[0]
        self._move_bucket(node, self.free_whole[node], self.free_whole[node] + 1)

    def place_shared(self, index: int, item: PackItem) -> ItemPlace | None:
        """Best fit into an open GPU, else open a GPU on the best node."""
        key = self.best_open(item)
        if key is None:
            node = self.best_node(1, item.units)
            if node is None:
                return None
            key = (node, self._take_slot(node))
        self.add_shared(key, item.units[key[0]], index)
        return ItemPlace(key[0], (key[1],))


def _size_key(item: PackItem) -> int:
    return item.whole * CAPACITY if item.whole else item.smallest


def _decreasing(items: Sequence[PackItem], chosen: Iterable[int]) -> list[int]:
    """Items in the order the constructions place them.

    Pinned items first (they have one choice), then whole-GPU items, widest groups first,
    then shared items, largest first.
    """
    return sorted(
        chosen,
        key=lambda i: (len(items[i].units) != 1, -items[i].whole, -_size_key(items[i]), i),
    )


def _construct(
    nodes: Sequence[PackNode], items: Sequence[PackItem], chosen: Iterable[int]
) -> _State:
    state = _State(nodes)
    places: list[ItemPlace | None] = [None] * len(items)
    for index in _decreasing(items, chosen):
        item = items[index]
        if not item.units:
            continue
        if item.whole:
            node = state.best_node(item.whole, item.units)
            if node is not None:
                places[index] = state.place_whole(node, item.whole)
        else:
            places[index] = state.place_shared(index, item)
    state.places = places
    _empty_least_filled(state, items)
    return state


def _empty_least_filled(state: _State, items: Sequence[PackItem]) -> None:
    """Try to move every item of the least-filled shared GPUs into other open GPUs."""
    for key in sorted(state.remaining, key=lambda k: (-state.remaining[k], k)):
        if key not in state.remaining:
            continue
        tenants = sorted(state.tenants[key], key=lambda i: (-_size_key(items[i]), i))
        moved: list[tuple[int, tuple[int, int]]] = []
        for index in tenants:
            target = state.best_open(items[index], exclude=key)
            if target is None:
                break
            state.remove_shared(key, items[index].units[key[0]], index)
            state.add_shared(target, items[index].units[target[0]], index)
            moved.append((index, target))
        if len(moved) == len(tenants):
            state.close_shared(key)
            for index, target in moved:
                state.places[index] = ItemPlace(target[0], (target[1],))
        else:  # undo: this GPU stays
            for index, target in reversed(moved):
                state.remove_shared(target, items[index].units[target[0]], index)
                state.add_shared(key, items[index].units[key[0]], index)


def _to_packing(state: _State) -> Packing:
    return _summarize(state.places, state.nodes, proven=False)


def _summarize(
    places: Sequence[ItemPlace | None], nodes: Sequence[PackNode], proven: bool
) -> Packing:
    used: dict[int, set[int]] = defaultdict(set)
    for place in places:
        if place is not None:
            used[place.node].update(place.slots)
    return Packing(
        places=tuple(places),
        gpus_used=sum(len(slots) for slots in used.values()),
        nodes_used=len(used),
        proven_optimal=proven,
    )


def gpu_lower_bound(nodes: Sequence[PackNode], items: Sequence[PackItem]) -> int:
    """GPUs that any packing of all the items needs.

    Whole groups, plus the larger of the shared units over capacity and the count of shared
    items too big to pair with any other.
    """
    whole = sum(item.whole for item in items if item.whole)
    shared = [item.smallest for item in items if not item.whole and item.units]
    volume = -(-sum(shared) // CAPACITY)
    big = sum(1 for size in shared if size * 2 > CAPACITY)
    return whole + max(volume, big)


def lower_bound(nodes: Sequence[PackNode], items: Sequence[PackItem]) -> tuple[int, int]:
    """(GPUs, nodes) that any packing placing every item needs at least."""
    gpus = gpu_lower_bound(nodes, items)
    widest = max((node.gpus for node in nodes), default=1) or 1
    pinned = {next(iter(item.units)) for item in items if len(item.units) == 1}
    return gpus, max(-(-gpus // widest), len(pinned))


def _heuristic(nodes: Sequence[PackNode], items: Sequence[PackItem]) -> Packing:
    everything = range(len(items))
    best = _to_packing(_construct(nodes, items, everything))
    if best.unplaced == 0:
        return best
    # Scarcity: admit the smallest items first to place as many as possible, then pack that
    # set largest first; keep whichever solution is better.
    by_size = sorted(everything, key=lambda i: (_size_key(items[i]), i))
    low, high = 0, len(by_size)
    while low < high:  # largest prefix of the smallest items that all fit
        middle = (low + high + 1) // 2
        if _to_packing(_construct(nodes, items, by_size[:middle])).unplaced == len(items) - middle:
            low = middle
        else:
            high = middle - 1
    admitted = list(by_size[:low])
    for index in by_size[low : low + 64]:  # then anything else that still fits (bounded)
        trial = _to_packing(_construct(nodes, items, [*admitted, index]))
        if trial.unplaced == len(items) - len(admitted) - 1:
            admitted.append(index)
    candidate = _to_packing(_construct(nodes, items, admitted))
    return min(best, candidate, key=lambda p: p.objective)


class _Search:
    """Depth-first branch and bound over items in decreasing order."""

    def __init__(
        self, nodes: Sequence[PackNode], items: Sequence[PackItem], incumbent: Packing
    ) -> None:
        self.nodes = nodes
        self.items = items
        self.order = _decreasing(items, range(len(items)))
        self.best = incumbent
        self.budget = EXACT_NODE_BUDGET
        self.exhausted = False
        self.free_whole = [node.gpus for node in nodes]
        self.open: list[list[int]] = [[] for _ in nodes]  # remaining units of open shared GPUs
        self.places: list[ItemPlace | None] = [None] * len(items)
        self.slots_used = [0] * len(nodes)
        # Pinned-to nodes are unique; otherwise nodes alike in size are interchangeable.
        pinned = {next(iter(it.units)) for it in items if len(it.units) == 1}
        self.kind = [
            (node.gpus, tuple(sorted((i, it.units.get(n)) for i, it in enumerate(items))))
            if n not in pinned
            else ("pinned", n)
            for n, node in enumerate(nodes)
        ]
        # Suffix sums of the smallest size of shared items and of whole GPUs, for bounds.
        self.suffix_units = [0] * (len(self.order) + 1)
        self.suffix_whole = [0] * (len(self.order) + 1)
        for position in range(len(self.order) - 1, -1, -1):
            item = items[self.order[position]]
            self.suffix_units[position] = self.suffix_units[position + 1] + (
                0 if item.whole else item.smallest
            )
            self.suffix_whole[position] = self.suffix_whole[position + 1] + item.whole

    def _gpus(self) -> int:
        return sum(self.slots_used)

    def _nodes(self) -> int:
        return sum(1 for used in self.slots_used if used)

    def _bound(self, position: int, unplaced: int) -> tuple[int, int, int]:
        """A lower bound on the objective of any completion that places every item left."""
        room = sum(sum(r) for r in self.open)
        extra_units = max(0, self.suffix_units[position] - room)
        gpus = self._gpus() + self.suffix_whole[position] + -(-extra_units // CAPACITY)
        return (unplaced, gpus, self._nodes())

    def run(self) -> Packing:
        self._visit(0, 0)
        return dataclasses.replace(self.best, proven_optimal=not self.exhausted)

    def _visit(self, position: int, unplaced: int) -> None:
        if self.budget <= 0:
            self.exhausted = True
            return
        self.budget -= 1
        best = self.best.objective
        if unplaced > best[0]:
            return
        if unplaced == best[0] and self._bound(position, unplaced) >= best:
            return
        if position == len(self.order):
            self.best = _summarize(self.places, self.nodes, proven=False)
            return
        index = self.order[position]
        item = self.items[index]
        if item.whole:
            self._branch_whole(position, unplaced, index, item)
        else:
            self._branch_shared(position, unplaced, index, item)
        if unplaced + 1 <= self.best.unplaced:  # leave it out
            self._visit(position + 1, unplaced + 1)

    def _new_node_kinds(self, node: int, seen: set[object]) -> bool:
        """Whether opening on this node differs from nodes tried already (symmetry breaking)."""
        signature = (self.kind[node], self.free_whole[node], tuple(sorted(self.open[node])))
        if signature in seen:
            return False
        seen.add(signature)
        return True

    def _branch_whole(self, position: int, unplaced: int, index: int, item: PackItem) -> None:
        seen: set[object] = set()
        candidates = sorted(item.units, key=lambda n: (self.free_whole[n], n))
        for node in candidates:
            if self.free_whole[node] < item.whole or not self._new_node_kinds(node, seen):
                continue
            start = self.slots_used[node]
            self.free_whole[node] -= item.whole
            self.slots_used[node] += item.whole
            self.places[index] = ItemPlace(node, tuple(range(start, start + item.whole)))
            self._visit(position + 1, unplaced)
            self.places[index] = None
            self.slots_used[node] -= item.whole
            self.free_whole[node] += item.whole

    def _branch_shared(self, position: int, unplaced: int, index: int, item: PackItem) -> None:
        # Open GPUs first, tightest fit first; then a new GPU on each distinct kind of node.
        fits = sorted(
            (remaining - item.units[node], node, slot)
            for node in item.units
            for slot, remaining in enumerate(self.open[node])
            if remaining >= item.units[node]
        )
        tried: set[tuple[int, int]] = set()
        for _, node, slot in fits:
            if (node, self.open[node][slot]) in tried:
                continue
            tried.add((node, self.open[node][slot]))
            self.open[node][slot] -= item.units[node]
            self.places[index] = ItemPlace(node, (-1 - slot,))
            self._visit(position + 1, unplaced)
            self.places[index] = None
            self.open[node][slot] += item.units[node]
        seen: set[object] = set()
        candidates = sorted(item.units, key=lambda n: (self.free_whole[n], n))
        for node in candidates:
            if self.free_whole[node] < 1 or not self._new_node_kinds(node, seen):
                continue
            self.free_whole[node] -= 1
            self.slots_used[node] += 1
            self.open[node].append(CAPACITY - item.units[node])
            self.places[index] = ItemPlace(node, (-len(self.open[node]),))
            self._visit(position + 1, unplaced)
            self.places[index] = None
            self.open[node].pop()
            self.slots_used[node] -= 1
            self.free_whole[node] += 1


def _renumber(
    places: Sequence[ItemPlace | None], items: Sequence[PackItem]
) -> tuple[ItemPlace | None, ...]:
    """Give slots their final numbers per node: whole groups first, then shared GPUs."""
    result: list[ItemPlace | None] = list(places)
    next_slot: dict[int, int] = defaultdict(int)
    shared_slot: dict[tuple[int, int], int] = {}
    order = _decreasing(items, [i for i, p in enumerate(places) if p is not None])
    for index in order:
        place = places[index]
        assert place is not None
        if items[index].whole:
            start = next_slot[place.node]
            next_slot[place.node] += items[index].whole
            result[index] = ItemPlace(place.node, tuple(range(start, start + items[index].whole)))
    for index in order:
        place = places[index]
        assert place is not None
        if not items[index].whole:
            key = (place.node, place.slots[0])
            if key not in shared_slot:
                shared_slot[key] = next_slot[place.node]
                next_slot[place.node] += 1
            result[index] = ItemPlace(place.node, (shared_slot[key],))
    return tuple(result)


def pack(nodes: Sequence[PackNode], items: Sequence[PackItem]) -> Packing:
    """Place the items: most placed, then fewest GPUs, then fewest nodes (see module doc)."""
    solution = _heuristic(nodes, items)
    if solution.unplaced == 0 and solution.objective[1:] == lower_bound(nodes, items):
        solution = dataclasses.replace(solution, proven_optimal=True)
    elif len(items) <= EXACT_MAX_ITEMS:
        solution = _Search(nodes, items, solution).run()
    return dataclasses.replace(solution, places=_renumber(solution.places, items))
