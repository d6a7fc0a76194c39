"""`rackserve reconcile` (one pass) and `rackserve controller` (passes forever, on the head).

Each pass observes the cluster (alive nodes by their `rackserve/node` label, Serve's
applications), asks `deployer.planning.reconcile.decide` what to do with what was deployed
last (the state directory's record, else the cluster's), and does it through `launch.deploy`
with `--allow-partial`: a model that no longer fits is reported unplaced, the others serve.
The controller remembers since when each node has been gone, logs one line per change of what
it decides (not one per pass), and retries an unreachable cluster with a growing pause.

Ray is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from deployer.config.models_config import ModelConfig, ModelManager
from deployer.errors import RackserveError
from deployer.planning.reconcile import Decision, Observed, decide
from deployer.planning.redeploy import Deployed
from deployer.planning.serve_config import APP_NAME
from deployer.serving.applications import engine_apps, running_engines
from deployer.serving.launch import DeployOptions, Say, alive_by_label, as_last_deployed, deploy
from deployer.serving.probe import connect
from deployer.serving.state import FileStateStore, deployed_store


@dataclasses.dataclass(frozen=True)
class ReconcileOptions:
    """How a pass deploys and its timing.

    The HTTP address and the reserve come from what was deployed last (`Deployed.settings`);
    those of `deploy` are used only for a record that has none.
    """

    deploy: DeployOptions
    grace_s: float = 60.0
    """A node gone this long has its models placed elsewhere."""
    join_timeout_s: float = 300.0
    """After a cold start, how long to wait for the nodes last used before deploying without."""


def observe(address: str, state_dir: Path | None) -> tuple[Deployed | None, Observed]:
    """What was deployed last and what the cluster shows now."""
    import ray
    from ray import serve

    connect(address)
    try:
        desired = deployed_store(state_dir).read()
        rows = alive_by_label(ray.nodes())  # type: ignore[no-untyped-call]
        applications = serve.status().applications
        placed = [p["model_id"] for p in (desired.placements if desired else [])]
        apps = engine_apps(applications)
        engines = frozenset(m for m in placed if m in apps)
        running = running_engines(applications)
        return desired, Observed(
            alive=frozenset(rows),
            ingress=APP_NAME in applications,
            engines=engines,
            serving=frozenset(m for m in engines if running.intersection(apps[m])),
            addresses={name: str(row["NodeManagerAddress"]) for name, row in rows.items()},
        )
    finally:
        ray.shutdown()


def act(
    desired: Deployed,
    decision: Decision,
    options: ReconcileOptions,
    say: Say,
    alive: frozenset[str],
) -> list[str]:
    """Deploy what `desired` records, with its settings, planning without the lost nodes.

    With a cluster file, its nodes not in `alive` (Ray's alive nodes) are planned without too:
    a node that holds nothing may be down while another model is placed. The caller holds the
    state directory's lock (`reconcile_once`).

    Returns the models left unplaced (no room, or pinned to a lost node).
    """
    models = ModelManager([ModelConfig.model_validate(m) for m in desired.models])
    deploy_options = dataclasses.replace(
        as_last_deployed(options.deploy, desired),
        allow_partial=True,
        plan_only=False,
        yes=True,  # the controller moves what a lost node held: that is its job
        allow_downtime=True,  # and restores service first, beside the old engine or not
        lost=(*decision.lost, *_down_in_file(options.deploy, decision.lost, alive)),
    )
    unplaced: list[str] = []

    def on_plan(plan: Any) -> None:
        unplaced.extend(f"{u.model_id} ({u.reason})" for u in plan.unplaced)

    deploy(models, deploy_options, say, on_plan, lock_held=True)
    return unplaced


@dataclasses.dataclass(frozen=True)
class Memory:
    """What the controller remembers between passes (see `decide`)."""

    gone_for_s: Mapping[str, float]
    never_seen: frozenset[str] = frozenset()
    joined: frozenset[str] = frozenset()


class Tracker:
    """The controller's bookkeeping of nodes between passes: pure, with the clock passed in.

    A node joins once it has been alive for `settle_s` without a break: a worker that has just
    booted is not given an engine in its first seconds (a rack test saw an engine placed on a
    node 11 s after its power came back never start). It counts as joined until a pass that
    could use it completes (a deploy or nothing to do): a pass that fails (a node's probe not
    answering yet, Ray busy) or waits leaves the join pending, so the models left unplaced are
    placed by a later pass, never forgotten.
    """

    def __init__(self, started: float, settle_s: float = 0.0) -> None:
        self.started = started
        self.settle_s = settle_s
        self.last_seen: dict[str, float] = {}
        self.up_since: dict[str, float] = {}
        self.usable: frozenset[str] = frozenset()
        """The settled nodes the last completed pass could place models on."""
        self._settled: frozenset[str] = frozenset()

    def memory(self, desired: Deployed | None, alive: frozenset[str], now: float) -> Memory:
        """What `decide` needs for this pass, given the nodes Ray shows alive now."""
        for node in alive:
            self.last_seen[node] = now
            self.up_since.setdefault(node, now)
        for node in set(self.up_since) - alive:
            del self.up_since[node]  # down: its next start counts from when it is back
        self.usable &= alive  # a node that went away and comes back joins again
        self._settled = frozenset(n for n in alive if now - self.up_since[n] >= self.settle_s)
        used = {p["node"] for p in (desired.placements if desired else [])}
        return Memory(
            {n: now - self.last_seen.get(n, self.started) for n in used if n not in alive},
            never_seen=frozenset(n for n in used if n not in self.last_seen),
            joined=self._settled - self.usable,
        )

    def completed(self, decision: Decision) -> None:
        """A pass ended (not raised) with `decision`: unless it waited, its settled nodes count."""
        if decision.action != "wait":
            self.usable = self._settled


def _down_in_file(
    options: DeployOptions, lost: tuple[str, ...], alive: frozenset[str]
) -> list[str]:
    if options.cluster is None:
        return []
    return [n.name for n in options.cluster.nodes if n.name not in alive and n.name not in lost]


def reconcile_once(
    options: ReconcileOptions,
    say: Say,
    memory: Memory | None = None,
    seen: tuple[Deployed | None, Observed] | None = None,
) -> Decision:
    """One pass: observe (unless `seen`), decide, act.

    `memory` is the controller's; without it (`rackserve reconcile`), a node Ray does not show
    alive counts as gone past the grace period and every alive node as just joined: a pass run
    by hand acts at once.
    """
    state_dir = options.deploy.state_dir
    desired, observed = seen or observe(options.deploy.address, state_dir)
    decision = _decide(desired, observed, memory, options)
    if decision.action != "deploy" or desired is None:
        return decision
    disk = FileStateStore(state_dir) if state_dir else None
    with disk.lock(options.deploy.lock_wait_s) if disk else contextlib.nullcontext():
        if disk:
            # Looked at again under the lock: a deploy that ran meanwhile wins, never undone.
            desired, observed = observe(options.deploy.address, state_dir)
            decision = _decide(desired, observed, memory, options)
            if decision.action != "deploy" or desired is None:
                return decision
            disk.record("reconcile", reason=decision.reason, lost=list(decision.lost))
        say(decision.reason)
        unplaced = act(desired, decision, options, say, observed.alive)
        if disk and unplaced:
            disk.record("unplaced", models=unplaced)
    for line in unplaced:
        say(f"unplaced: {line}")
    return decision


def _decide(
    desired: Deployed | None,
    observed: Observed,
    memory: Memory | None,
    options: ReconcileOptions,
) -> Decision:
    if memory is None:
        used = {p["node"] for p in (desired.placements if desired else [])}
        gone = dict.fromkeys(used, options.grace_s + options.join_timeout_s)
        memory = Memory(gone, joined=observed.alive)
    return decide(
        desired,
        observed,
        memory.gone_for_s,
        grace_s=options.grace_s,
        join_timeout_s=options.join_timeout_s,
        never_seen=memory.never_seen,
        joined=memory.joined,
    )


def run_controller(
    options: ReconcileOptions,
    say: Say,
    interval_s: float = 10.0,
    passes: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    seen: Callable[[Deployed | None, Observed], None] | None = None,
) -> None:
    """Passes every `interval_s` (forever, or `passes` times); never raises on a failed pass.

    `seen` gets what each pass observed (the metrics exporter keeps it).
    """
    tracker = Tracker(clock(), settle_s=options.grace_s)
    said = ""
    pause = interval_s
    count = 0
    while passes is None or count < passes:
        count += 1
        try:
            desired, observed = observe(options.deploy.address, options.deploy.state_dir)
            if seen is not None:
                seen(desired, observed)
            memory = tracker.memory(desired, observed.alive, clock())
            decision = reconcile_once(options, say, memory, (desired, observed))
            tracker.completed(decision)
            line = f"{decision.action}: {decision.reason}"
            pause = interval_s
        except RackserveError as exc:
            line = f"pass failed: {exc}"
            pause = min(pause * 2, 300.0)
        if line != said:  # one line per change of state, not one per pass
            say(line)
            said = line
        if passes is None or count < passes:
            time.sleep(pause)
