"""What a reconcile pass does, decided from what was deployed and what Ray shows: pure.

The controller observes the cluster (alive nodes, Serve's applications) and asks `decide`:
- nothing runs although something was deployed (a cold boot, a head restarted without GCS
  persistence): deploy it again once the nodes it used have joined, or after `join_timeout_s`
  without the ones still missing;
- a node that held engines is gone for `grace_s` or more: re-plan without it; its models go
  where there is room, and healthy engines elsewhere stay as they are;
- an engine application or the ingress is missing (removed by hand): deploy to restore it;
- a model the last plan left unplaced, and a node has joined since: deploy to place it;
- otherwise nothing. A node that comes back gets no running engine moved back to it.

A node not seen alive since the controller started (the head rebooted, the workers boot more
slowly) counts as lost only after `join_timeout_s`, not `grace_s`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Literal

from deployer.planning.redeploy import Deployed


@dataclasses.dataclass(frozen=True)
class Observed:
    """What Ray shows: the nodes alive (by `rackserve/node` name) and Serve's applications."""

    alive: frozenset[str]
    ingress: bool
    """The `rackserve` application exists."""
    engines: frozenset[str]
    """Models whose engine application exists (in any state)."""
    serving: frozenset[str] = frozenset()
    """Models whose engine has a running replica."""
    addresses: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """The alive nodes' IPs, by name."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """A pass's verdict: do nothing, wait for nodes, or deploy (planning without `lost`)."""

    action: Literal["none", "wait", "deploy"]
    reason: str
    lost: tuple[str, ...] = ()
    """Nodes to plan without: their models move to nodes with room."""


def decide(
    desired: Deployed | None,
    observed: Observed,
    gone_for_s: Mapping[str, float],
    *,
    grace_s: float = 60.0,
    join_timeout_s: float = 300.0,
    never_seen: frozenset[str] = frozenset(),
    joined: frozenset[str] = frozenset(),
) -> Decision:
    """The action for one pass.

    `gone_for_s[node]`: seconds since the node was last seen alive; `never_seen`: nodes not
    seen alive since the controller started; `joined`: nodes alive now and not at the last pass.
    """
    if desired is None or not desired.models:
        return Decision("none", "nothing is deployed")
    unplaced = desired.unplaced()
    if not desired.placements:
        return _place_again(unplaced, joined) or Decision("none", "no model has a place")
    used = sorted({p["node"] for p in desired.placements})
    missing = [n for n in used if n not in observed.alive]
    overdue = [
        n
        for n in missing
        if gone_for_s.get(n, math.inf) >= (join_timeout_s if n in never_seen else grace_s)
    ]
    if not observed.ingress and not observed.engines:
        waited = min((gone_for_s.get(n, math.inf) for n in missing), default=math.inf)
        if missing and waited < join_timeout_s:
            return Decision("wait", f"nothing runs; waiting for {', '.join(missing)} to join")
        why = "nothing runs (a cold start or a head restart)"
        if missing:
            why += f"; {', '.join(missing)} did not join in {join_timeout_s:.0f} s"
        return Decision("deploy", f"{why}: deploying what was deployed last", tuple(missing))
    if overdue:
        moved = [p["model_id"] for p in desired.placements if p["node"] in overdue]
        return Decision(
            "deploy",
            f"{', '.join(overdue)} lost for {grace_s:.0f} s or more: re-placing {', '.join(moved)}",
            tuple(overdue),
        )
    if missing:
        return Decision("wait", f"{', '.join(missing)} not alive; within the grace period")
    absent = [p["model_id"] for p in desired.placements if p["model_id"] not in observed.engines]
    if absent or not observed.ingress:
        what = ", ".join(absent) if absent else "the ingress"
        return Decision("deploy", f"{what} not running: deploying again")
    return _place_again(unplaced, joined) or Decision("none", "everything deployed is running")


def _place_again(unplaced: list[str], joined: frozenset[str]) -> Decision | None:
    if not unplaced or not joined:
        return None
    return Decision(
        "deploy",
        f"{', '.join(sorted(joined))} joined: placing {', '.join(unplaced)}, left unplaced last",
    )
