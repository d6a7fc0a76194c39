"""The Serve applications rackserve runs: one per engine, and the ingress in front of them.

Ray Serve 2.60 hashes an application's arguments into the code version of every deployment in
it, so one `build_openai_app` application would restart every engine whenever a model is
added or removed. Each engine is therefore an application of its own (`build_llm_deployment`,
no route), and the ingress (`OpenAiIngress`, the class `build_openai_app` uses) is the
application `rackserve`, holding a handle to each engine. Names are set here, not derived from
Ray's own naming rules.

Ray is imported inside the functions only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from deployer.planning.serve_config import APP_NAME, REPLICA_ENV, EngineSpec
from deployer.serving.standin import StandInEngine

HEAD_NODE_RESOURCE = "node:__internal_head__"
"""The resource only Ray's head node has (`ray._common.constants.HEAD_NODE_RESOURCE_NAME`)."""
ENGINE_DEPLOYMENT = "engine"
"""The deployment inside each engine's application (one per application, so one name)."""

Engine = Literal["vllm", "standin"]


ROUTE_REFRESH_S = 1.0
"""How often the ingress reads Serve's status to follow engines that move."""
ROUTE_SETTLE_S = 4.0
"""How long a deploy waits, once a moved engine runs, before it deletes the old one: a few of
the ingress's refreshes, so that it routes to the new engine first."""
SLOT_MARK = "~slot"
"""Separates a model's name from its slot in an engine application's name."""


def model_app_name(model_id: str, slot: int = 0) -> str:
    """The Serve application that runs one model's engine in `slot`.

    A model has two slots: a make-before-break move starts the new engine in the slot the old
    one does not use, so both run, under two names, until the ingress routes to the new one.
    """
    name = f"{APP_NAME}-model:{model_id}"
    return name if slot == 0 else f"{name}{SLOT_MARK}{slot}"


def app_model(app_name: str) -> tuple[str, int] | None:
    """The model and slot an engine application runs; None for any other application."""
    base = model_app_name("")
    if not app_name.startswith(base):
        return None
    model_id, mark, slot = app_name[len(base) :].rpartition(SLOT_MARK)
    if mark and slot.isdigit():
        return model_id, int(slot)
    return app_name[len(base) :], 0


def is_ours(app_name: str) -> bool:
    """True for the ingress and every engine application rackserve runs."""
    return app_name == APP_NAME or app_model(app_name) is not None


def engine_apps(applications: Mapping[str, Any]) -> dict[str, list[str]]:
    """Each model's engine applications (from `serve.status().applications`), newest first.

    Two exist only during a make-before-break move, or after one was interrupted.
    """
    found: dict[str, list[tuple[float, str]]] = {}
    for name, application in applications.items():
        owner = app_model(name)
        if owner is not None:
            deployed_at = float(getattr(application, "last_deployed_time_s", 0.0) or 0.0)
            found.setdefault(owner[0], []).append((deployed_at, name))
    return {m: [name for _, name in sorted(apps, reverse=True)] for m, apps in found.items()}


def current_app(applications: Mapping[str, Any], model_id: str) -> str:
    """The application that serves `model_id` now: its newest, else the slot-0 name."""
    return (engine_apps(applications).get(model_id) or [model_app_name(model_id)])[0]


def free_slot(applications: Mapping[str, Any], model_id: str) -> int:
    """The slot a new engine of `model_id` starts in while the current one keeps serving."""
    owner = app_model(current_app(applications, model_id))
    return 1 - owner[1] if owner else 0


def running_engines(applications: Mapping[str, Any]) -> frozenset[str]:
    """The applications (from `serve.status().applications`) whose engine has a RUNNING replica."""
    running = set()
    for name, application in applications.items():
        deployment = application.deployments.get(ENGINE_DEPLOYMENT)
        if deployment is not None and deployment.replica_states.get("RUNNING", 0) > 0:
            running.add(name)
    return frozenset(running)


def serving_routes(applications: Mapping[str, Any], model_ids: list[str]) -> dict[str, str | None]:
    """Each model's engine application to route to; None for a model with none serving.

    That is its newest application with a running replica that is not being deleted.
    """
    running = running_engines(applications)
    apps = engine_apps(applications)
    routes: dict[str, str | None] = {}
    for model_id in model_ids:
        live = [
            name
            for name in apps.get(model_id, [])
            if name in running and app_status(applications[name]) != "DELETING"
        ]
        routes[model_id] = live[0] if live else None
    return routes


@dataclasses.dataclass(frozen=True)
class DeploymentView:
    """A deployment as `serve.status()` shows it: its replicas counted by state."""

    replica_states: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class ApplicationView:
    """An application as `serve.status()` shows it: the facts routing reads, nothing else."""

    status: str
    last_deployed_time_s: float
    deployments: Mapping[str, DeploymentView]


def applications_from_details(details: Mapping[str, Any]) -> dict[str, ApplicationView]:
    """The applications of Serve's instance details (the controller's plain dict), as views.

    `serve.status()` gives the same facts after validating the whole dict into Serve's schema
    and recording a usage tag in the GCS. The ingress reads them every `ROUTE_REFRESH_S`, so it
    walks the dict instead, at a fraction of the CPU (docs/7-benchmarks.md has the figures).
    """
    views = {}
    for name, application in (details.get("applications") or {}).items():
        deployments = {}
        for deployment_name, deployment in (application.get("deployments") or {}).items():
            states: dict[str, int] = defaultdict(int)
            for replica in deployment.get("replicas") or []:
                states[_plain(replica.get("state"))] += 1
            deployments[deployment_name] = DeploymentView(replica_states=dict(states))
        views[name] = ApplicationView(
            status=_plain(application.get("status")),
            last_deployed_time_s=float(application.get("last_deployed_time_s") or 0.0),
            deployments=deployments,
        )
    return views


def _plain(value: Any) -> str:
    """An enum's value (Serve's states are str enums, whose str() is their qualified name)."""
    return str(getattr(value, "value", value))


def app_status(application: Any) -> str:
    """An application's status (of `serve.status().applications`) as its plain name."""
    return _plain(application.status)


def quiet_builders() -> None:
    """Ray's builders log every option at INFO: keep them to warnings."""
    for name in ("ray.serve", "ray.llm"):
        logging.getLogger(name).setLevel(logging.WARNING)


def engine_application(spec: EngineSpec, engine: Engine = "vllm") -> Any:
    """The engine's Serve application: vLLM's, or the same deployment running the stand-in.

    For `standin` only the class changes (`deployer.serving.standin`): placement group bundles,
    strategy and label selectors, actor options, runtime env and autoscaling stay vLLM's, and
    the stand-in gets the same LLMConfig, as a dict.
    """
    from ray.serve.llm import LLMConfig, build_llm_deployment

    config = LLMConfig(**spec.llm_config)
    application = build_llm_deployment(config, override_serve_options={"name": ENGINE_DEPLOYMENT})
    if engine != "standin":
        return application
    deployment = application._bound_deployment
    return deployment.options(func_or_class=StandInEngine).bind(llm_config=config.model_dump())


def ingress_key(
    specs: Sequence[EngineSpec], prefix: str, cpu_only: bool, api_keys: str | None = None
) -> str:
    """What the ingress application is built from, besides where the engines run.

    Two deploys with the same key need not restart the ingress: it holds handles to the
    engines' applications by name, and lists the same model cards.
    """
    cards = sorted(
        (s.model_id, s.llm_config.get("engine_kwargs", {}).get("max_model_len")) for s in specs
    )
    key: dict[str, Any] = {"cards": cards, "prefix": prefix, "cpu_only": cpu_only}
    if api_keys is not None:  # absent without keys: an ingress from before keys is unchanged
        key["api_keys"] = api_keys
    return json.dumps(key, default=str)


def ingress_application(
    specs: Sequence[EngineSpec],
    cpu_only: bool,
    apps: Mapping[str, str] | None = None,
    api_keys: str | None = None,
) -> Any:
    """The ingress over handles to the engines' applications, as `build_openai_app` builds it.

    `apps`: each model's engine application now (slot 0 for those not given); the ingress
    follows an engine that moves to its other slot by itself. `api_keys`: the key file on the
    head that every request's key is checked against (`deployer.serving.auth`); None: no keys.

    The class is `RackserveIngress` (`deployer.serving.ingress`): Serve LLM's `OpenAiIngress`
    answering a prompt 503 for a model with no running engine. One replica, on the head.
    """
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import init
    from ray.serve.llm import LLMConfig
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    from deployer.serving.auth import ApiKeyMiddleware  # noqa: PLC0415 - imports Ray
    from deployer.serving.ingress import RackserveIngress  # noqa: PLC0415 - imports Ray

    configs: list[Any] = [LLMConfig(**spec.llm_config) for spec in specs]
    options = OpenAiIngress.get_deployment_options(configs)
    actor = dict(options.get("ray_actor_options", {}))
    # losing a worker then never takes the ingress, and every model's requests, away
    actor["resources"] = {**actor.get("resources", {}), HEAD_NODE_RESOURCE: 0.001}
    if cpu_only:  # keep two models within 2-CPU nodes (docs/ray-and-vllm-facts.md)
        actor["num_cpus"] = 0
    actor["runtime_env"] = {"env_vars": dict(REPLICA_ENV)}
    options["ray_actor_options"] = actor
    apps = apps or {}
    handles = {
        c.model_id: serve.get_deployment_handle(
            ENGINE_DEPLOYMENT, app_name=apps.get(c.model_id) or model_app_name(c.model_id)
        )
        for c in configs
    }
    cards = {c.model_id: to_model_metadata(c.model_id, c) for c in configs}
    app = init()  # Serve LLM's app and middlewares; the key check goes in front of them
    if api_keys is not None:
        app.add_middleware(ApiKeyMiddleware, key_file=api_keys)
    ingress = make_fastapi_ingress(RackserveIngress, app=app)
    deployment: Any = serve.deployment(ingress, **options)
    return deployment.bind(llm_deployments=handles, model_cards=cards)
