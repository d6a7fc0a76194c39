"""What a deploy would do to each model: keep, start, stop, restart or move, and why.

Pure: what was deployed last, the engines Serve runs now and the re-plan (`Redeploy`) in, one
`ModelChange` per model out. `deploy --diff` prints it; `deploy` prints it and asks before it
stops, restarts or moves anything that runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal

from deployer.planning.redeploy import Deployed, Redeploy

Action = Literal["keep", "start", "stop", "restart", "move", "unplaced"]

DISRUPTIVE: frozenset[Action] = frozenset({"stop", "restart", "move"})
"""The actions that interrupt an engine that runs now."""


@dataclasses.dataclass(frozen=True)
class ModelChange:
    """One model's fate in a deploy."""

    model_id: str
    action: Action
    before: str
    """Where it runs now (`node GPUs 0,1`, `node`), or "" when it does not run."""
    after: str
    """Where it will run, or "" when it will not."""
    why: str


def where(placement: Mapping[str, Any] | None) -> str:
    """A placement as `node` or `node GPUs 0,1`; "" for none."""
    if placement is None:
        return ""
    gpus = placement.get("gpus") or []
    return f"{placement['node']} GPUs {','.join(map(str, gpus))}" if gpus else placement["node"]


def changed_fields(before: Any, after: Any, path: str = "") -> list[str]:
    """The dotted paths where two JSON-like values differ, keys in sorted order."""
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        found: list[str] = []
        for key in sorted(set(before) | set(after), key=str):
            found += changed_fields(before.get(key), after.get(key), f"{path}{key}.")
        return found
    return [] if before == after else [path.rstrip(".")]


def plan_diff(
    deployed: Deployed | None,
    running: Collection[str],
    change: Redeploy,
    models: Sequence[Mapping[str, Any]],
    lost: Collection[str] = (),
    drained: Collection[str] = (),
) -> list[ModelChange]:
    """Per model, in the configuration's order (removed ones last): what the deploy does.

    `deployed`: the last record (None when nothing runs); `running`: the engines of it Serve
    runs; `models`: the configuration as deployed (`models_document`); `lost` and `drained`:
    nodes planned without. A restart or move says whether its new engine starts beside the old
    one (make-before-break) or after it stops.
    """
    old_models = {m["model_id"]: m for m in (deployed.models if deployed else [])}
    old_places = {p["model_id"]: p for p in (deployed.placements if deployed else [])}
    old_engines = deployed.engines if deployed else {}
    new_places = {p.model_id: p.as_json() for p in change.plan.placements}
    new_engines = {s.model_id: s.llm_config for s in change.specs}
    unplaced = {u.model_id: u.reason for u in change.plan.unplaced}
    wanted = [m["model_id"] for m in models]
    changes = []
    for model_id in [*wanted, *sorted(set(running) - set(wanted))]:
        runs = model_id in running
        before = where(old_places.get(model_id)) if runs else ""
        after = where(new_places.get(model_id))
        config = changed_fields(old_models.get(model_id), _model(models, model_id))
        if model_id not in wanted:
            changes.append(ModelChange(model_id, "stop", before, "", "removed from the models"))
        elif model_id in unplaced:
            action: Action = "stop" if runs else "unplaced"
            changes.append(ModelChange(model_id, action, before, "", unplaced[model_id]))
        elif model_id in change.keep:
            changes.append(ModelChange(model_id, "keep", before, after, "unchanged"))
        elif not runs:
            why = "not running" if model_id in old_models else "new"
            changes.append(ModelChange(model_id, "start", "", after, why))
        else:
            node = old_places.get(model_id, {}).get("node")
            engine = changed_fields(old_engines.get(model_id), new_engines.get(model_id))
            if node in lost:
                why = f"node {node} is lost"
            elif node in drained:
                why = f"node {node} is drained"
            elif config:
                why = f"changed: {', '.join(config)}"
            elif engine:
                why = f"launch description changed: {', '.join(engine[:4])}"
            else:
                why = "re-planned"
            if model_id in change.make_before_break:
                why += "; the new engine starts first, the old stops once it serves"
            elif model_id in change.downtime:
                why += "; no room for both: stops first"
            action = "move" if before != after else "restart"
            changes.append(ModelChange(model_id, action, before, after, why))
    return changes


def _model(models: Sequence[Mapping[str, Any]], model_id: str) -> Mapping[str, Any] | None:
    return next((m for m in models if m["model_id"] == model_id), None)


def disruptive(changes: Sequence[ModelChange]) -> list[ModelChange]:
    """The changes that interrupt a running engine (stop, restart, move)."""
    return [c for c in changes if c.action in DISRUPTIVE]
