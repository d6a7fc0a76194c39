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

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from deployer.planning.serve_config import APP_NAME, REPLICA_ENV, EngineSpec
from deployer.serving.standin import StandInEngine

HEAD_NODE_RESOURCE = "node:__internal_head__"
"""The resource only Ray's head node has (`ray._common.constants.HEAD_NODE_RESOURCE_NAME`)."""
ENGINE_DEPLOYMENT = "engine"
"""The deployment inside each engine's application (one per application, so one name)."""

Engine = Literal["vllm", "standin"]


def model_app_name(model_id: str) -> str:
    """The Serve application that runs one model's engine."""
    return f"{APP_NAME}-model:{model_id}"


def is_ours(app_name: str) -> bool:
    """True for the ingress and every engine application rackserve runs."""
    return app_name == APP_NAME or app_name.startswith(model_app_name(""))


def running_engines(applications: Mapping[str, Any]) -> frozenset[str]:
    """The applications (from `serve.status().applications`) whose engine has a RUNNING replica."""
    running = set()
    for name, application in applications.items():
        deployment = application.deployments.get(ENGINE_DEPLOYMENT)
        if deployment is not None and deployment.replica_states.get("RUNNING", 0) > 0:
            running.add(name)
    return frozenset(running)


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


def ingress_key(specs: Sequence[EngineSpec], prefix: str, cpu_only: bool) -> str:
    """What the ingress application is built from, besides where the engines run.

    Two deploys with the same key need not restart the ingress: it holds handles to the
    engines' applications by name, and lists the same model cards.
    """
    cards = sorted(
        (s.model_id, s.llm_config.get("engine_kwargs", {}).get("max_model_len")) for s in specs
    )
    key: dict[str, Any] = {"cards": cards, "prefix": prefix, "cpu_only": cpu_only}
    return json.dumps(key, default=str)


def ingress_application(specs: Sequence[EngineSpec], cpu_only: bool) -> Any:
    """The ingress over handles to the engines' applications, as `build_openai_app` builds it.

    The class is `RackserveIngress` (`deployer.serving.ingress`): Serve LLM's `OpenAiIngress`
    answering a prompt 503 for a model with no running engine. One replica, on the head.
    """
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm import LLMConfig
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

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
    handles = {
        c.model_id: serve.get_deployment_handle(
            ENGINE_DEPLOYMENT, app_name=model_app_name(c.model_id)
        )
        for c in configs
    }
    cards = {c.model_id: to_model_metadata(c.model_id, c) for c in configs}
    deployment: Any = serve.deployment(make_fastapi_ingress(RackserveIngress), **options)
    return deployment.bind(llm_deployments=handles, model_cards=cards)
