"""What Ray's GCS remembers of each engine's replicas: since when one runs, how many stopped.

Serve names every replica actor `SERVE_REPLICA::<application>#<deployment>#<id>` and starts a
new actor (a new id) for each restart, move or replacement, so the GCS actor table, which keeps
dead actors too, holds each engine's history for as long as the cluster's GCS does (across a
head restart when GCS persistence is on). Restarts count from the application's last deploy
(Serve's `last_deployed_time_s`): a replica of an earlier deployment (before a `down`, a move or
a config change) is not one. `replica_history` reads the table; `history_of` is the pure part.
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
    """Replicas of this engine started since its last deploy that have stopped (crashes,
    failed health checks, replacements)."""


def history_of(
    actors: Iterable[Mapping[str, Any]], deployed_at: Mapping[str, float]
) -> dict[str, ReplicaHistory]:
    """Per engine application, from GCS actor records and last deploy times.

    `actors`: records with `Name`, `State` and `StartTime` (ms); `deployed_at`: each
    application's last deploy (Unix seconds; 0 when unknown).
    """
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
        start = float(actor.get("StartTime") or 0) / 1000.0
        if actor.get("State") == "DEAD":
            stopped[app] += start >= deployed_at.get(app, 0.0)
        elif actor.get("State") == "ALIVE" and start:
            started[app].append(start)
    return {
        app: ReplicaHistory(since=max(started[app], default=None), restarts=stopped[app])
        for app in started
    }


def replica_history(applications: Mapping[str, Any]) -> dict[str, ReplicaHistory]:
    """`history_of` the connected cluster's GCS actor table (dead actors included).

    `applications`: as `serve.status().applications` gives them.
    """
    from ray._private import state  # Ray's own `ray.util.state` needs the dashboard

    deployed_at = {name: app.last_deployed_time_s for name, app in applications.items()}
    return history_of(state.actors().values(), deployed_at)
