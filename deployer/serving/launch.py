"""`rackserve deploy`, `status` and `down`: the side-effect shell around the pure core.

Connect to Ray, probe (or check a cluster file), re-plan against what runs, then stop, start
and keep engines as the re-plan says (`deployer.serving.applications` holds the applications
themselves). Engines start in waves (see `deployer.planning.serve_config`): Ray's own GPU
choice then reproduces the plan, and two engines never start on one GPU at once. What was
deployed is kept in the cluster (`deployer.serving.state`), so deploying the same models again
changes nothing.

Progress goes to the caller through `say` (one plain line each) and `on_plan`. Ray is imported
inside the functions only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from deployer.config.cluster import NODE_LABEL, Cluster, Node
from deployer.config.models_config import ModelConfig, ModelManager
from deployer.errors import ConfigError, ExitCode, RackserveError
from deployer.planning.estimate import MemoryEstimate
from deployer.planning.placement import DEFAULT_RESERVE_GIB, Plan
from deployer.planning.plan_diff import ModelChange, disruptive, plan_diff
from deployer.planning.redeploy import Deployed, Redeploy, models_document, replan
from deployer.planning.serve_config import (
    APP_NAME,
    DEFAULT_HTTP_HOST,
    DEFAULT_HTTP_PORT,
    EngineSpec,
    proxy_location,
    route_prefix,
    waves,
)
from deployer.serving.applications import (
    ENGINE_DEPLOYMENT,
    ROUTE_SETTLE_S,
    Engine,
    app_model,
    app_status,
    current_app,
    engine_application,
    engine_apps,
    free_slot,
    ingress_application,
    ingress_key,
    is_ours,
    model_app_name,
    quiet_builders,
)
from deployer.serving.probe import connect, probe_cluster
from deployer.serving.replicas import ReplicaHistory, replica_history
from deployer.serving.state import FileStateStore, StateStore, deployed_store
from deployer.serving.tls import TlsFiles
from deployer.serving.weights import stage_weights
from deployer.sources.estimates import estimate_models

Say = Callable[[str], None]


class LaunchError(RackserveError):
    """Ray Serve could not start or update the application."""


class NotConfirmedError(RackserveError):
    """The deploy would interrupt running engines and nobody confirmed it; nothing changed."""

    exit_code = ExitCode.BAD_INPUT


class UnplacedError(RackserveError):
    """Some model does not fit; nothing was launched."""

    exit_code = ExitCode.UNPLACED


@dataclasses.dataclass(frozen=True)
class DeployOptions:
    """What `rackserve deploy` was asked."""

    address: str = "auto"
    plan_only: bool = False
    allow_partial: bool = False
    reserve_gib: float = DEFAULT_RESERVE_GIB
    http_host: str = DEFAULT_HTTP_HOST
    http_port: int = DEFAULT_HTTP_PORT
    engine: Engine = "vllm"
    """`standin` runs a stand-in replica instead of vLLM on the same bundles (rehearsals)."""
    cluster: Cluster | None = None
    """A cluster file to plan on instead of probing (logical GPUs); checked against Ray first."""
    state_dir: Path | None = None
    """Also keep the record, an event log and a lock in this directory (the head's disk)."""
    lock_wait_s: float = 60.0
    """How long a deploy waits for another one holding the state directory's lock."""
    lost: tuple[str, ...] = ()
    """Nodes gone: plan without them, and start their engines elsewhere (reconcile)."""
    yes: bool = False
    """Stop, restart or move running engines without asking (`--yes`; the controller)."""
    allow_downtime: bool = False
    """Stop an engine before its new one starts when there is no room for both (the controller)."""
    drained: tuple[str, ...] | None = None
    """Nodes to leave empty (`drain`, `undrain`); None: those the last deploy left drained."""
    rebalance: bool = False
    """Plan every model afresh instead of keeping running ones where they are (`--rebalance`)."""
    api_keys: Path | None = None
    """The API key file the ingress checks, on the head (`--api-keys`); None: no keys asked."""
    tls: TlsFiles | None = None
    """The certificate and key Serve's HTTP proxies serve HTTPS with; None: plain HTTP."""
    stage_only: bool = False
    """Plan as a deploy would, stage every placed model's weights, launch nothing (`stage`)."""
    start_timeout_s: float | None = None
    """How long a wave's engines may take to run; None: as long as they take. Those late are
    removed and the deploy fails, so that the next one starts them afresh (the controller)."""

    def http_settings(self) -> dict[str, Any]:
        """What Serve applies only when it starts: the endpoint's address, port and TLS."""
        return {
            "http_host": self.http_host,
            "http_port": self.http_port,
            "ssl_certfile": str(self.tls.certfile) if self.tls else None,
            "ssl_keyfile": str(self.tls.keyfile) if self.tls else None,
        }

    def endpoint(self, prefix: str) -> str:
        """The OpenAI base URL these options serve."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.http_host}:{self.http_port}{prefix.rstrip('/')}/v1"


def as_last_deployed(options: DeployOptions, desired: Deployed) -> DeployOptions:
    """`options` with the engine and the deploy settings the record keeps, for a redeploy.

    A record from before API keys has no `api_keys`: it is redeployed without keys, as it ran.
    """
    settings = desired.settings
    keys = settings.get("api_keys")
    cert, key = settings.get("ssl_certfile"), settings.get("ssl_keyfile")
    return dataclasses.replace(
        options,
        engine="standin" if desired.engine == "standin" else "vllm",
        http_host=str(settings.get("http_host", options.http_host)),
        http_port=int(settings.get("http_port", options.http_port)),
        reserve_gib=float(settings.get("reserve_gib", options.reserve_gib)),
        api_keys=Path(keys) if isinstance(keys, str) else None,
        tls=TlsFiles(Path(cert), Path(key)) if cert and key else None,
    )


def serve_http_settings() -> dict[str, Any] | None:
    """The HTTP settings the running Serve applied when it started; None: Serve is not running.

    Read from Serve's controller client, as `serve.start` itself does to warn that new options
    are ignored (`ray.serve.context` is private; Ray 2.60 has no public reader).
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    http = client.http_config
    return {
        "http_host": http.host,
        "http_port": http.port,
        "ssl_certfile": http.ssl_certfile,
        "ssl_keyfile": http.ssl_keyfile,
    }


def check_http_settings(
    options: DeployOptions, serving: Mapping[str, Any] | None, applications: Sequence[str]
) -> bool:
    """Whether Serve must restart to apply `options`' address, port and TLS.

    Refused while any application runs: ours stop only with `rackserve down`, and another's is
    not ours to stop. Serve applies its HTTP options only when it starts (a running Serve
    ignores new ones with a warning): a deploy would say one endpoint and serve another.
    """
    asked = options.http_settings()
    if serving is None or serving == asked:
        return False
    if applications:
        shown = ", ".join(
            f"{k} {serving[k]!r} -> {asked[k]!r}" for k in asked if asked[k] != serving[k]
        )
        raise HttpSettingsError(
            f"Serve runs with other HTTP settings ({shown}) and applies new ones only when it "
            f"starts, which stops what runs ({', '.join(applications)}); nothing was changed. "
            "Run `rackserve down`, then deploy again; or deploy with the running settings"
        )
    return True


class HttpSettingsError(RackserveError):
    """A deploy asked for another address, port or TLS than the running Serve's; nothing changed."""

    exit_code = ExitCode.BAD_INPUT


def http_options(options: DeployOptions) -> dict[str, Any]:
    """Serve's `HTTPOptions` for `options`: address, port and, with TLS, the certificate."""
    http: dict[str, Any] = {"host": options.http_host, "port": options.http_port}
    if options.tls:
        http |= {"ssl_certfile": str(options.tls.certfile), "ssl_keyfile": str(options.tls.keyfile)}
    return http


def start_serve(options: DeployOptions, restart: bool, say: Say) -> None:
    """Start Serve with `options`' HTTP settings (a no-op when it runs).

    With `restart` (`check_http_settings`: nothing runs on it), Serve is stopped first.
    """
    from ray import serve

    if restart:
        say("Serve restarts to apply the new HTTP settings (nothing runs on it)")
        serve.shutdown()  # type: ignore[no-untyped-call]
    serve.start(
        proxy_location=proxy_location(options.http_host), http_options=http_options(options)
    )


class NoRoomError(RackserveError):
    """A restarted or moved engine cannot start beside its old one, and downtime was not allowed."""

    exit_code = ExitCode.UNPLACED


def _start_engines(
    specs: Sequence[EngineSpec],
    say: Say,
    engine: Engine,
    apps: Mapping[str, str],
    timeout_s: float | None = None,
) -> None:
    """Start the engines wave after wave, each as `apps[model]`; a wave starts together.

    With `timeout_s`, a wave's engines not running by then are removed and LaunchError says
    so: a placement group Ray never schedules (it happens when a node has just come back)
    otherwise blocks the deploy for good, and a new one is scheduled afresh.
    """
    from ray import serve
    from ray.serve.api import RunTarget

    grouped = waves(specs)
    for number, wave in enumerate(grouped, start=1):
        names = ", ".join(f"{s.model_id}@{s.node}" for s in wave)
        say(f"wave {number}/{len(grouped)}: starting {names}")
        targets = [
            RunTarget(engine_application(s, engine), name=apps[s.model_id], route_prefix=None)
            for s in wave
        ]
        try:
            serve.run_many(targets, wait_for_applications_running=timeout_s is None)
        except Exception as exc:  # Serve reports deploy failures as RuntimeError and kin
            raise LaunchError(
                f"Ray Serve could not start {names}: {str(exc).splitlines()[0]}. "
                "See `rackserve status` and the replica logs in the Ray session's logs/serve/"
            ) from None
        if timeout_s is not None:
            _wait_running([apps[s.model_id] for s in wave], names, timeout_s)


def _wait_running(apps: Sequence[str], names: str, timeout_s: float) -> None:
    """Wait for the applications to run; remove those late and raise LaunchError."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        statuses = serve.status().applications
        states = {app: app_status(statuses[app]) if app in statuses else "GONE" for app in apps}
        failed = [app for app, state in states.items() if state in {"DEPLOY_FAILED", "GONE"}]
        if failed:
            raise LaunchError(
                f"Ray Serve could not start {', '.join(failed)} ({names}): "
                + "; ".join(statuses[a].message for a in failed if a in statuses)
            )
        late = [app for app, state in states.items() if state != "RUNNING"]
        if not late:
            return
        if time.monotonic() > deadline:
            for app in late:
                serve.delete(app, _blocking=True)
            raise LaunchError(
                f"{', '.join(late)} ({names}) did not run within {timeout_s:.0f} s and "
                "were removed, so that the next deploy starts them afresh"
            )
        time.sleep(1.0)


def deploy(
    models: ModelManager,
    options: DeployOptions,
    say: Say,
    on_plan: Callable[[Plan], None],
    store: StateStore | None = None,
    lock_held: bool = False,
    on_diff: Callable[[list[ModelChange]], None] | None = None,
    confirm: Callable[[list[ModelChange]], bool] | None = None,
) -> Plan | None:
    """Probe, estimate, plan, show it (`on_plan`, `on_diff`), then launch it (unless plan_only).

    `on_diff` gets what the deploy does to each model (keep, start, stop, restart, move).

    When the launch would stop, restart or move a running engine, `confirm` is asked first
    (None: nobody can be asked) unless `options.yes`; refused, NotConfirmedError, and nothing
    changes.

    Returns the plan, or None when the same models are already deployed (nothing changes).

    Raises ConfigError on bad input and UnplacedError when some model does not fit and
    partial deployments were not allowed; in both cases nothing is launched or changed. With
    `options.state_dir`, the deploy holds that directory's lock (StateError when another
    deploy keeps it past `lock_wait_s`), mirrors the record there and logs the change;
    `lock_held`: the caller holds it already (a reconcile pass).
    """
    import ray

    estimates = estimate_models(models)  # bad input fails here, before Ray is even reached
    prefix = route_prefix(models.list())
    disk = FileStateStore(options.state_dir) if options.state_dir else None
    with disk.lock(options.lock_wait_s) if disk and not lock_held else contextlib.nullcontext():
        connect(options.address)
        try:
            return _deploy(
                models, options, say, (on_plan, on_diff, confirm), store, disk, estimates, prefix
            )
        finally:
            ray.shutdown()


def _deploy(
    models: ModelManager,
    options: DeployOptions,
    say: Say,
    shown: tuple[
        Callable[[Plan], None],
        Callable[[list[ModelChange]], None] | None,
        Callable[[list[ModelChange]], bool] | None,
    ],
    store: StateStore | None,
    disk: FileStateStore | None,
    estimates: Sequence[MemoryEstimate],
    prefix: str,
) -> Plan | None:
    """`deploy` once connected and holding the lock."""
    from ray import serve

    store = store or deployed_store(options.state_dir)
    deployed = store.read()
    applications = serve.status().applications
    running = APP_NAME in applications
    document = models_document(models)
    drained = tuple(
        options.drained if options.drained is not None else (deployed.drained if deployed else ())
    )
    restart_serve = not options.plan_only and check_http_settings(
        options, serve_http_settings(), sorted(applications)
    )
    unchanged = (
        deployed is not None
        and deployed.same_as(document, options.engine)
        and list(drained) == deployed.drained
        and not deployed.unplaced()  # a plan now may find them room
        and deployed.settings.get("api_keys")
        == (str(options.api_keys) if options.api_keys else None)
    )
    if (
        unchanged
        and running
        and not options.lost
        and not options.rebalance
        and not options.stage_only
    ):
        say("nothing to change: these models are deployed as planned")
        return None
    cluster = _cluster_for(options, drained)
    serving = engine_apps(applications)
    engines_running = [
        model_id for model_id in (deployed.engines if deployed and running else {})
        if model_id in serving
    ]  # fmt: skip
    change = replan(
        cluster,
        models,
        estimates,
        deployed if running else None,
        engines_running,
        options.reserve_gib,
        engine=options.engine,
        memory_counts_ours=options.cluster is None,
        lost=options.lost,
        drained=drained,
        rebalance=options.rebalance,
    )
    plan = change.plan
    on_plan, on_diff, confirm = shown
    on_plan(plan)
    changes = plan_diff(
        deployed if running else None,
        engines_running,
        change,
        document,
        options.lost,
        drained,
    )
    if on_diff is not None:
        on_diff(changes)
    if _stops_at_the_plan(plan, options):
        return plan
    if options.stage_only:
        stage_weights(change.specs, models, cluster, say)
        return plan
    if change.downtime and not options.allow_downtime:
        raise NoRoomError(
            f"no room to start the new engine of {', '.join(change.downtime)} beside the one "
            "that runs (make-before-break); nothing was changed. Pass --allow-downtime to stop "
            "it first (it answers 503 until its new engine runs), or make room: add a node, "
            "remove a model"
        )
    interrupted = disruptive(changes)
    if interrupted and not options.yes and (confirm is None or not confirm(interrupted)):
        named = ", ".join(f"{c.model_id} ({c.action})" for c in interrupted)
        raise NotConfirmedError(
            f"this deploy would interrupt {len(interrupted)} running model(s): {named}; "
            "nothing was changed. Confirm on a terminal, or pass --yes."
        )
    stage_weights(change.start, models, cluster, say)  # before anything stops or starts
    start_serve(options, restart_serve, say)
    quiet_builders()
    apps = _stop_and_start(change, applications, say, options.engine, options.start_timeout_s)
    specs = change.specs
    keys = str(options.api_keys) if options.api_keys else None
    front = ingress_key(specs, prefix, plan.device == "cpu", keys)
    if running and deployed is not None and deployed.ingress == front:
        # Same models behind the same route: the ingress follows restarted and moved engines by
        # itself; restarting it would fail requests to every model.
        say("the ingress serves the same models: left running")
    else:
        serve.run(
            ingress_application(specs, plan.device == "cpu", apps, keys),
            name=APP_NAME,
            route_prefix=prefix,
        )
    _retire(set(apps.values()), change.make_before_break, say)
    store.write(
        Deployed(
            models=document,
            placements=[p.as_json() for p in plan.placements],
            engines={s.model_id: dict(s.llm_config) for s in specs},
            engine=options.engine,
            ingress=front,
            settings={
                **options.http_settings(),
                "reserve_gib": options.reserve_gib,
                "api_keys": keys,
            },
            drained=list(drained),
        )
    )
    if disk:
        disk.record(
            "deployed",
            started=[s.model_id for s in change.start],
            stopped=change.stop,
            kept=change.keep,
            unplaced=[u.model_id for u in plan.unplaced],
            engine=options.engine,
        )
    say(
        f"deployed {len(specs)} model(s) at {options.endpoint(prefix)}: one engine application "
        f"each, behind the ingress application {APP_NAME!r}"
    )
    return plan


def _stops_at_the_plan(plan: Plan, options: DeployOptions) -> bool:
    """True for `--plan-only`; UnplacedError when models do not fit and that is not allowed."""
    if plan.unplaced and options.plan_only:
        raise UnplacedError(f"{len(plan.unplaced)} model(s) do not fit (reasons above)")
    if options.plan_only:
        return True
    if plan.unplaced and not options.allow_partial:
        raise UnplacedError(
            f"{len(plan.unplaced)} model(s) do not fit (reasons above); nothing was "
            "launched. Pass --allow-partial to launch the others."
        )
    return False


def _stop_and_start(
    change: Redeploy,
    applications: Mapping[str, Any],
    say: Say,
    engine: Engine,
    timeout_s: float | None = None,
) -> dict[str, str]:
    """Stop what stops first, start what starts; each placed model's engine application.

    A make-before-break engine starts in its model's other slot, beside the old engine.
    """
    from ray import serve

    serving = engine_apps(applications)
    for model_id in change.stop:
        say(f"stopping {model_id}")
        for name in serving.get(model_id, []):
            serve.delete(name)
    if change.keep:
        say(f"unchanged, left running: {', '.join(change.keep)}")
    apps = {m: names[0] for m, names in serving.items() if m in change.keep}
    for spec in change.start:
        later = spec.model_id in change.make_before_break
        apps[spec.model_id] = model_app_name(
            spec.model_id, free_slot(applications, spec.model_id) if later else 0
        )
    _start_engines(change.start, say, engine, apps, timeout_s)
    return apps


def _retire(serving: set[str], moved: Sequence[str], say: Say) -> None:
    """Delete every engine application of ours not in `serving`.

    These are the old engines of a make-before-break move, deleted once the ingress routes to
    the new ones, and any left over by an interrupted deploy. Serve lets each finish the
    requests it holds before it stops.
    """
    from ray import serve

    old = [
        name for name in serve.status().applications
        if app_model(name) is not None and name not in serving
    ]  # fmt: skip
    if not old:
        return
    if moved:
        say(
            f"new engines of {', '.join(moved)} serve; stopping the old ones once the ingress "
            f"routes to the new ({ROUTE_SETTLE_S:.0f} s)"
        )
        time.sleep(ROUTE_SETTLE_S)
    for name in old:
        say(f"stopping {name}")
        serve.delete(name)


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """One model as `rackserve status` shows it."""

    model_id: str
    node: str
    gpus: tuple[int, ...]
    state: str
    healthy: bool
    message: str
    since: float | None = None
    """When its running engine replica started (Unix seconds); None when none runs."""
    restarts: int = 0
    """Engine replicas of this model that stopped since it was last deployed (`replicas`)."""


@dataclasses.dataclass(frozen=True)
class DeploymentStatus:
    """What `rackserve status` shows: each model, and the nodes drained."""

    models: list[ModelStatus]
    drained: list[str]
    api_keys: str | None = None
    """The key file the endpoint checks; None: no keys, anyone reaching it may use every model."""
    tls: bool = False
    """The endpoint serves HTTPS (`--ssl-certfile`)."""


def model_statuses(
    address: str, store: StateStore | None = None, state_dir: Path | None = None
) -> list[ModelStatus]:
    """Each deployed model's node, GPUs, Serve state and health; empty when none is deployed."""
    return deployment_status(address, store, state_dir).models


def deployment_status(
    address: str, store: StateStore | None = None, state_dir: Path | None = None
) -> DeploymentStatus:
    """Each deployed model's node, GPUs, Serve state and health, and the drained nodes.

    What was deployed comes from the cluster's record, else the state directory's (after a head
    restart the cluster has none): a model whose engine or the ingress is not running is then
    shown, not serving.
    """
    import ray
    from ray import serve

    connect(address)
    try:
        deployed = (store or deployed_store(state_dir)).read()
        applications = serve.status().applications
        if deployed is None:
            return DeploymentStatus([], [])
        history = replica_history(applications)
        ingress = APP_NAME in applications
        statuses = []
        for placement in deployed.placements:
            model_id = placement["model_id"]
            name = current_app(applications, model_id)
            app = applications.get(name)
            deployment = app.deployments.get(ENGINE_DEPLOYMENT) if app else None
            state = deployment.status.value if deployment else "MISSING"
            message = deployment.message if deployment else "its engine is not running"
            if not ingress:
                message = f"the ingress {APP_NAME!r} is not running; {message}".rstrip("; ")
            replicas = history.get(name, ReplicaHistory(None, 0))
            statuses.append(
                ModelStatus(
                    model_id=model_id,
                    node=placement["node"],
                    gpus=tuple(placement["gpus"]),
                    state=state,
                    healthy=state == "HEALTHY" and ingress,
                    message=message,
                    since=replicas.since,
                    restarts=replicas.restarts,
                )
            )
        for model_id in deployed.unplaced():
            statuses.append(
                ModelStatus(
                    model_id=model_id,
                    node="-",
                    gpus=(),
                    state="UNPLACED",
                    healthy=False,
                    message="the last plan found it no room (or its pinned node is lost or "
                    "drained); the controller places it when a node joins",
                )
            )
        keys = deployed.settings.get("api_keys")
        return DeploymentStatus(
            statuses,
            list(deployed.drained),
            keys if isinstance(keys, str) else None,
            tls=bool(deployed.settings.get("ssl_certfile")),
        )
    finally:
        ray.shutdown()


def set_drained(
    node: str,
    drain: bool,
    options: DeployOptions,
    say: Say,
    on_plan: Callable[[Plan], None],
    on_diff: Callable[[list[ModelChange]], None] | None = None,
    force: bool = False,
) -> Plan | None:
    """`rackserve drain NODE` (`drain`) or `undrain NODE`: durable in the deployed record.

    Draining redeploys what was deployed last, with its settings, leaving `node` empty: its
    engines move to other nodes, each new engine started before the old one stops. When a model
    would find no room, nothing changes (UnplacedError naming it) unless `force`: it is then
    stopped and reported unplaced. Undraining moves nothing back; models left unplaced are
    placed if the node gives them room. Raises ConfigError for a node Ray and the plan do not
    know, or when nothing is deployed.
    """
    disk = FileStateStore(options.state_dir) if options.state_dir else None
    with disk.lock(options.lock_wait_s) if disk else contextlib.nullcontext():
        desired, known = _record_and_nodes(options)
        if desired is None:
            raise ConfigError(
                "nothing is deployed: there is nothing to drain or undrain; run `rackserve "
                "deploy` first (every later plan keeps to the nodes drained then)"
            )
        if node not in known:
            raise ConfigError(
                f"no node named {node!r}: Ray's labelled nodes and the plan's are "
                f"{', '.join(sorted(known)) or 'none'}; give one of them"
            )
        drained = set(desired.drained)
        if (node in drained) == drain and not (drain and _holds(desired, node)):
            say(f"node {node} is {'already' if drain else 'not'} drained: nothing to change")
            return None
        drained = drained | {node} if drain else drained - {node}
        before = set(desired.unplaced())

        def checked(plan: Plan) -> None:
            on_plan(plan)
            left = [u.model_id for u in plan.unplaced if u.model_id not in before]
            if drain and left and not force:
                raise UnplacedError(
                    f"draining {node} leaves no room for {', '.join(left)}; nothing was "
                    "changed. Make room (add a node, remove a model), or pass --force to stop "
                    "them (reported unplaced) and drain anyway"
                )

        redeploy = dataclasses.replace(
            as_last_deployed(options, desired),
            drained=tuple(sorted(drained)),
            allow_partial=True,
            yes=True,  # asked for by name
        )
        models = ModelManager([ModelConfig.model_validate(m) for m in desired.models])
        plan = deploy(models, redeploy, say, checked, lock_held=True, on_diff=on_diff)
        if disk:
            disk.record("drained" if drain else "undrained", node=node)
        say(f"node {node} is {'drained' if drain else 'back in service'}")
        return plan


def _holds(deployed: Deployed, node: str) -> bool:
    return any(p["node"] == node for p in deployed.placements)


def _record_and_nodes(options: DeployOptions) -> tuple[Deployed | None, set[str]]:
    """The deployed record, and every node name Ray (alive or not), the plan or the file know."""
    import ray

    connect(options.address)
    try:
        deployed = deployed_store(options.state_dir).read()
        known = {
            str(name)
            for row in ray.nodes()  # type: ignore[no-untyped-call]
            if (name := (row.get("Labels") or {}).get(NODE_LABEL))
        }
    finally:
        ray.shutdown()
    known |= {p["node"] for p in (deployed.placements if deployed else [])}
    known |= {*(deployed.drained if deployed else [])}
    known |= {n.name for n in (options.cluster.nodes if options.cluster else [])}
    return deployed, known


DOWN_LOCK_WAIT_S = 300.0
"""How long `down` waits for a deploy or a controller pass that holds the state's lock."""


def down(
    address: str, say: Say, store: StateStore | None = None, state_dir: Path | None = None
) -> None:
    """Remove the application and what rackserve remembered of it (also in `state_dir`).

    With `state_dir`, under its lock, and the record is forgotten before anything is deleted:
    a controller pass waiting for the lock then finds nothing to restore.
    """
    import ray
    from ray import serve

    disk = FileStateStore(state_dir) if state_dir is not None else None
    with disk.lock(DOWN_LOCK_WAIT_S) if disk else contextlib.nullcontext():
        connect(address)
        try:
            ours = sorted(
                (name for name in serve.status().applications if is_ours(name)),
                key=lambda name: name != APP_NAME,
            )
            (store or deployed_store(state_dir)).write(None)
            for name in ours:  # the ingress first, so no request reaches a stopping engine
                serve.delete(name)
            nothing = f"no {APP_NAME!r} application is deployed"
            say(f"removed {', '.join(ours)}" if ours else nothing)
            if disk:
                disk.record("removed", applications=ours)
        finally:
            ray.shutdown()


def _cluster_for(options: DeployOptions, drained: Sequence[str] = ()) -> Cluster:
    """The cluster to plan on, without the lost and drained nodes.

    That is the probe's, or the cluster file checked against Ray's nodes.
    """
    import ray

    out = {*options.lost, *drained}
    if options.cluster is None:
        probed = probe_cluster(options.address)
        return Cluster(nodes=[n for n in probed.nodes if n.name not in out])
    kept = [n for n in options.cluster.nodes if n.name not in out]
    if not kept:
        raise LaunchError(
            f"every node of the cluster file is lost or drained: {', '.join(sorted(out))}"
        )
    return checked_against_ray(Cluster(nodes=kept), ray.nodes())  # type: ignore[no-untyped-call]


def alive_by_label(node_table: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The alive rows of `ray.nodes()` by their `rackserve/node` label; unlabelled ones left out."""
    alive: dict[str, Mapping[str, Any]] = {}
    for row in node_table:
        name = (row.get("Labels") or {}).get(NODE_LABEL)
        if row.get("Alive") and name:
            alive[str(name)] = row
    return alive


def checked_against_ray(cluster: Cluster, node_table: Sequence[Mapping[str, Any]]) -> Cluster:
    """The cluster file's nodes, each matched to its alive Ray node (`ray.nodes()` rows).

    Every node of the file must be an alive Ray node labelled `rackserve/node=<name>` with at
    least the file's GPUs (Ray numbers a node's GPUs 0..N-1, so every index must be below N).
    The nodes come back with Ray's node id, IP and labels, so the launcher can pin to them.
    Raises ConfigError naming each node that does not match and what to fix.
    """
    alive = alive_by_label(node_table)
    problems: list[str] = []
    nodes: list[Node] = []
    for node in cluster.nodes:
        ray_node = alive.get(node.name)
        if ray_node is None:
            problems.append(
                f"node {node.name!r}: no alive Ray node has the label {NODE_LABEL}={node.name}; "
                f"start its Ray with `ray start --labels {NODE_LABEL}={node.name}` or correct "
                f"the name (Ray's labelled nodes: {', '.join(sorted(alive)) or 'none'})"
            )
            continue
        ray_gpus = int(float((ray_node.get("Resources") or {}).get("GPU", 0)))
        beyond = sorted(gpu.index for gpu in node.gpus if gpu.index >= ray_gpus)
        if len(node.gpus) > ray_gpus or beyond:
            problems.append(
                f"node {node.name!r}: the file lists {len(node.gpus)} GPU(s)"
                + (f" (indices {beyond} among them)" if beyond else "")
                + f" but Ray has {ray_gpus} there"
                + (f" (GPUs 0..{ray_gpus - 1})" if ray_gpus else "")
                + f"; list only the GPUs Ray has, or start that node's Ray with "
                f"`--num-gpus {len(node.gpus)}`"
            )
            continue
        ray_labels = ray_node.get("Labels") or {}
        labels = {**node.labels, **{str(k): str(v) for k, v in ray_labels.items()}}
        nodes.append(
            node.model_copy(
                update={
                    "ray_node_id": str(ray_node["NodeID"]),
                    "ip": str(ray_node["NodeManagerAddress"]),
                    "labels": labels,
                }
            )
        )
    if problems:
        raise ConfigError(problems, source="--cluster file (checked against the Ray cluster)")
    return Cluster(nodes=nodes)
