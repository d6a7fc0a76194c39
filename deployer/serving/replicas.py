"""What Ray's GCS remembers of each engine's replicas: since when one runs, how many stopped.

Serve names every replica actor `SERVE_REPLICA::<application>#<deployment>#<id>` and starts a
new actor (a new id) for each restart, move or replacement, so the GCS actor table, which keeps
dead actors too, holds each engine's history for as long as the cluster's GCS does (across a
head restart when GCS persistence is on). `replica_history` reads that table; `history_of`
is the pure part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from deployer.serving.applications import ENGINE_DEPLOYMENT

REPLICA_PREFIX = "SERVE_REPLICA::"
"""Serve's prefix for a replica actor's name (`REPLICA_ID_FULL_ID_STR_PREFIX`)."""


@dataclasses.dataclass(frozen=True)
class ReplicaHistory:
    """One engine application's replicas as the GCS remembers them."""

    since: float | None
    """When the newest live replica's actor started (Unix seconds); None when none is alive."""
    restarts: int
    """Replica actors of this engine that have stopped: crashes, replacements and moves."""


def history_of(actors: Iterable[Mapping[str, Any]]) -> dict[str, ReplicaHistory]:
    """Per engine application, from GCS actor records (`Name`, `State`, `StartTime` in ms)."""
    started: dict[str, list[float]] = {}
    stopped: dict[str, int] = {}
    for actor in actors:
        name = str(actor.get("Name") or "")
        if not name.startswith(REPLICA_PREFIX):
            continue
        app, _, rest = name.removeprefix(REPLICA_PREFIX).rpartition("#")[0].rpartition("#")
        if rest != ENGINE_DEPLOYMENT or not app:
            continue
        started.setdefault(app, [])
        stopped.setdefault(app, 0)
        if actor.get("State") == "DEAD":
            stopped[app] += 1
        elif actor.get("State") == "ALIVE" and actor.get("StartTime"):
            started[app].append(float(actor["StartTime"]) / 1000.0)
    return {
        app: ReplicaHistory(since=max(started[app], default=None), restarts=stopped[app])
        for app in started
    }


def replica_history() -> dict[str, ReplicaHistory]:
    """`history_of` the connected cluster's GCS actor table (dead actors included)."""
    from ray._private import state  # Ray's own `ray.util.state` needs the dashboard

    return history_of(state.actors().values())
