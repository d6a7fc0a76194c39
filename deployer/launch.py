"""Launch a plan as vLLM engines under Ray Serve: `rackserve deploy`, `status` and `down`.

The side-effect shell around the pure core: connect to Ray, probe, plan, then build one
`LLMConfig` per model and run it with Ray Serve behind one OpenAI-compatible ingress.

Ray Serve 2.60 hashes an application's arguments into the code version of every deployment in
it, so one `build_openai_app` application restarts every engine whenever a model is added or
removed. rackserve therefore runs each engine as an application of its own
(`build_llm_deployment`, no route) and the ingress (`OpenAiIngress`, the class
`build_openai_app` uses) as the application `rackserve`, holding a handle to each engine:
deploying a changed list starts only new or changed engines, stops removed ones, and restarts
only the ingress (about a second). Engines start in waves (see `deployer.serve_config`): Ray's
first-fit then reproduces the plan, and two engines never start on one GPU at once. What was
deployed is kept in Ray's internal key-value store, so deploying the same models again
changes nothing.

Ray is imported inside the functions only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from deployer.cluster import NODE_LABEL, Cluster, Node
from deployer.errors import ConfigError, ExitCode, RackserveError, printable
from deployer.models_config import ModelManager
from deployer.placement import DEFAULT_RESERVE_GIB, Plan
from deployer.probe import connect, probe_cluster
from deployer.redeploy import Deployed, models_document, replan
from deployer.render import print_plan
from deployer.serve_config import (
    APP_NAME,
    DEFAULT_HTTP_HOST,
    DEFAULT_HTTP_PORT,
    EngineSpec,
    route_prefix,
    waves,
)
from deployer.standin import StandInEngine
from deployer.workflow import estimate_models

KV_NAMESPACE = "rackserve"
KV_KEY = b"deployment"


class LaunchError(RackserveError):
    """Ray Serve could not start or update the application."""


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
    engine: Literal["vllm", "standin"] = "vllm"
    """`standin` runs a stand-in replica instead of vLLM on the same bundles (rehearsals)."""
    cluster: Cluster | None = None
    """A cluster file to plan on instead of probing (logical GPUs); checked against Ray first."""


def _read_deployed() -> Deployed | None:
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
    return Deployed.from_bytes(value if isinstance(value, bytes) else None)


def _write_deployed(deployed: Deployed | None) -> None:
    from ray.experimental import internal_kv

    if deployed is None:
        internal_kv._internal_kv_del(KV_KEY, namespace=KV_NAMESPACE)
    else:
        internal_kv._internal_kv_put(KV_KEY, deployed.to_bytes(), namespace=KV_NAMESPACE)


def model_app_name(model_id: str) -> str:
    """The Serve application that runs one model's engine."""
    return f"{APP_NAME}-model:{model_id}"


def deployment_name(model_id: str) -> str:
    """The engine's deployment name, as `build_llm_deployment` gives it."""
    return "LLMServer:" + model_id.replace("/", "--").replace(".", "_")


def _quiet_builders() -> None:
    for name in ("ray.serve", "ray.llm"):  # the builders log every option at INFO
        logging.getLogger(name).setLevel(logging.WARNING)


def _engine_application(spec: EngineSpec, engine: str = "vllm") -> Any:
    """The engine's Serve application: vLLM's, or the same deployment running the stand-in.

    For `standin` only the class changes (`deployer.standin`): name, placement group bundles,
    strategy and label selectors, actor options, runtime env and autoscaling stay vLLM's, and
    the stand-in gets the same LLMConfig, as a dict.
    """
    from ray.serve.llm import LLMConfig, build_llm_deployment

    config = LLMConfig(**spec.llm_config)
    application = build_llm_deployment(config)
    if engine != "standin":
        return application
    deployment = application._bound_deployment
    return deployment.options(func_or_class=StandInEngine).bind(llm_config=config.model_dump())


def _ingress_application(specs: Sequence[EngineSpec], cpu_only: bool) -> Any:
    """`OpenAiIngress` over handles to the engines' applications, as `build_openai_app` does."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm import LLMConfig
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    configs: list[Any] = [LLMConfig(**spec.llm_config) for spec in specs]
    options = OpenAiIngress.get_deployment_options(configs)
    if cpu_only:  # keep two models within 2-CPU nodes (docs/ray-and-vllm-facts.md)
        options["ray_actor_options"] = {**options.get("ray_actor_options", {}), "num_cpus": 0}
    handles = {
        c.model_id: serve.get_deployment_handle(
            deployment_name(c.model_id), app_name=model_app_name(c.model_id)
        )
        for c in configs
    }
    cards = {c.model_id: to_model_metadata(c.model_id, c) for c in configs}
    deployment: Any = serve.deployment(make_fastapi_ingress(OpenAiIngress), **options)
    return deployment.bind(llm_deployments=handles, model_cards=cards)


def _start_engines(
    specs: Sequence[EngineSpec], say: Callable[[str], None], engine: str = "vllm"
) -> None:
    """Start the engines wave after wave; each wave's applications start together."""
    from ray import serve
    from ray.serve.api import RunTarget

    grouped = waves(specs)
    for number, wave in enumerate(grouped, start=1):
        names = printable(", ".join(f"{s.model_id}@{s.node}" for s in wave))
        say(f"wave {number}/{len(grouped)}: starting {names}")
        targets = [
            RunTarget(
                _engine_application(s, engine), name=model_app_name(s.model_id), route_prefix=None
            )
            for s in wave
        ]
        try:
            serve.run_many(targets, wait_for_applications_running=True)
        except Exception as exc:  # Serve reports deploy failures as RuntimeError and kin
            raise LaunchError(
                f"Ray Serve could not start {names}: {str(exc).splitlines()[0]}. "
                "See `rackserve status` and the replica logs in the Ray session's logs/serve/"
            ) from None


def deploy(models: ModelManager, options: DeployOptions, console: Console) -> Plan | None:
    """Probe, estimate, plan, print the plan, then launch it (unless plan_only).

    Returns the plan, or None when the same models are already deployed (nothing changes).

    Raises ConfigError on bad input and UnplacedError when some model does not fit and
    partial deployments were not allowed; in both cases nothing is launched or changed.
    """
    import ray
    from ray import serve

    estimates = estimate_models(models)  # bad input fails here, before Ray is even reached
    prefix = route_prefix(models.list())
    connect(options.address)
    try:
        deployed = _read_deployed()
        applications = serve.status().applications
        running = APP_NAME in applications
        document = models_document(models)
        if deployed is not None and deployed.same_as(document, options.engine) and running:
            console.print("nothing to change: these models are deployed as planned")
            return None
        cluster = _cluster_for(options)
        engines_running = [
            model_id
            for model_id in (deployed.engines if deployed and running else {})
            if model_app_name(model_id) in applications
        ]
        change = replan(
            cluster,
            models,
            estimates,
            deployed if running else None,
            engines_running,
            options.reserve_gib,
            engine=options.engine,
            memory_counts_ours=options.cluster is None,
        )
        plan = change.plan
        print_plan(console, plan)
        if plan.unplaced and options.plan_only:
            raise UnplacedError(f"{len(plan.unplaced)} model(s) do not fit (reasons above)")
        if options.plan_only:
            return plan
        if plan.unplaced and not options.allow_partial:
            raise UnplacedError(
                f"{len(plan.unplaced)} model(s) do not fit (reasons above); nothing was "
                "launched. Pass --allow-partial to launch the others."
            )
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": options.http_host, "port": options.http_port},
        )
        _quiet_builders()
        for model_id in change.stop:
            console.print(Text(f"stopping {printable(model_id)}"))
            serve.delete(model_app_name(model_id))
        if change.keep:
            console.print(Text(f"unchanged, left running: {printable(', '.join(change.keep))}"))
        _start_engines(change.start, lambda line: console.print(Text(line)), options.engine)
        specs = change.specs
        serve.run(
            _ingress_application(specs, plan.device == "cpu"), name=APP_NAME, route_prefix=prefix
        )
        _write_deployed(
            Deployed(
                models=document,
                placements=[p.as_json() for p in plan.placements],
                engines={s.model_id: dict(s.llm_config) for s in specs},
                engine=options.engine,
            )
        )
        console.print(
            Text(
                f"deployed {len(specs)} model(s) as application {APP_NAME!r} at "
                f"http://{options.http_host}:{options.http_port}{prefix.rstrip('/')}/v1"
            )
        )
        return plan
    finally:
        ray.shutdown()


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """One model as `rackserve status` shows it."""

    model_id: str
    node: str
    gpus: tuple[int, ...]
    state: str
    healthy: bool
    message: str


def model_statuses(address: str) -> list[ModelStatus]:
    """Each deployed model's node, GPUs, Serve state and health."""
    import ray
    from ray import serve

    connect(address)
    try:
        deployed = _read_deployed()
        applications = serve.status().applications
        if deployed is None or APP_NAME not in applications:
            return []
        statuses = []
        for placement in deployed.placements:
            model_id = placement["model_id"]
            app = applications.get(model_app_name(model_id))
            deployment = app.deployments.get(deployment_name(model_id)) if app else None
            state = deployment.status.value if deployment else "MISSING"
            statuses.append(
                ModelStatus(
                    model_id=model_id,
                    node=placement["node"],
                    gpus=tuple(placement["gpus"]),
                    state=state,
                    healthy=state == "HEALTHY",
                    message=(deployment.message if deployment else "not in the application"),
                )
            )
        return statuses
    finally:
        ray.shutdown()


def status_table(statuses: Sequence[ModelStatus]) -> Table:
    """One row per deployed model."""
    table = Table(title=f"Application {APP_NAME!r}", title_justify="left")
    for column in ("model", "node", "GPUs", "state", "healthy", "message"):
        table.add_column(column)
    for s in statuses:
        table.add_row(
            Text(printable(s.model_id)),
            Text(printable(s.node)),
            ",".join(map(str, s.gpus)) or "-",
            s.state,
            "yes" if s.healthy else Text("no", style="bold red"),
            Text(printable(s.message)),
        )
    return table


def show_status(address: str, console: Console) -> bool:
    """Print the status table; True when every model is healthy."""
    statuses = model_statuses(address)
    if not statuses:
        console.print(f"no {APP_NAME!r} application is deployed")
        return True
    console.print(status_table(statuses))
    return all(s.healthy for s in statuses)


def down(address: str, console: Console) -> None:
    """Remove the application and what rackserve remembered of it."""
    import ray
    from ray import serve

    connect(address)
    try:
        ours = [
            name
            for name in serve.status().applications
            if name == APP_NAME or name.startswith(model_app_name(""))
        ]
        for name in ours:  # the ingress first, so no request reaches a stopping engine
            serve.delete(name)
        console.print(
            Text(f"removed {printable(', '.join(ours))}")
            if ours
            else f"no {APP_NAME!r} application is deployed"
        )
        _write_deployed(None)
    finally:
        ray.shutdown()


def _cluster_for(options: DeployOptions) -> Cluster:
    """The cluster to plan on: the probe's, or the cluster file checked against Ray's nodes."""
    import ray

    if options.cluster is None:
        return probe_cluster(options.address)
    return checked_against_ray(options.cluster, ray.nodes())  # type: ignore[no-untyped-call]


def checked_against_ray(cluster: Cluster, node_table: Sequence[Mapping[str, Any]]) -> Cluster:
    """The cluster file's nodes, each matched to its alive Ray node (`ray.nodes()` rows).

    Every node of the file must be an alive Ray node labelled `rackserve/node=<name>` with at
    least the file's GPUs (Ray numbers a node's GPUs 0..N-1, so every index must be below N).
    The nodes come back with Ray's node id, IP and labels, so the launcher can pin to them.
    Raises ConfigError naming each node that does not match and what to fix.
    """
    alive: dict[str, Mapping[str, Any]] = {}
    for row in node_table:
        name = (row.get("Labels") or {}).get(NODE_LABEL)
        if row.get("Alive") and name:
            alive[str(name)] = row
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
