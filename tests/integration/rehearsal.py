"""What the GPU rehearsal runs in a process of its own: `launch.deploy` with the stand-in.

Deploying imports Ray Serve LLM, hence vLLM and torch, which cannot load in a pytest process
where ansible-core has patched sys.intern (tests/ansible); so the rehearsal runs these
functions in one spawned process (`concurrent.futures` with the spawn start method), which
imports them once for all examples.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Any

from rich.console import Console

from deployer.cli.render import plain_lines, print_plan
from deployer.config.cluster import parse_cluster
from deployer.config.models_config import ModelConfig, ModelManager
from deployer.errors import RackserveError
from deployer.planning.placement import Plan
from deployer.serving.applications import (
    ENGINE_DEPLOYMENT,
    app_status,
    current_app,
    engine_apps,
    serving_routes,
)
from deployer.serving.launch import DeployOptions, deploy, down, set_drained
from deployer.serving.probe import connect
from deployer.serving.reconcile import ReconcileOptions, reconcile_once
from deployer.serving.standin import EngineReport
from deployer.serving.tls import TlsFiles
from tools.local_ray import HEAD_IP


def init_process() -> None:
    """Before Ray is imported: no driver call may start a Ray of its own.

    Serve's handle threads keep calling Ray after `ray.shutdown()`; with auto-connect they
    would start a local Ray (and write ~/.ray/auth_token).
    """
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"


@dataclasses.dataclass(frozen=True)
class Rehearsed:
    """One deploy with the stand-in: the plan deploy printed and every engine's report."""

    plan: Plan | None
    reports: dict[str, EngineReport]
    output: str


def deploy_standin(
    models: list[dict[str, Any]],
    cluster: str,
    address: str,
    port: int,
    reserve_gib: float,
    state_dir: str | None = None,
    tls: tuple[str, str] | None = None,
) -> Rehearsed:
    """Deploy `models` with the stand-in on the cluster file's nodes; read every engine's report.

    `tls`: a certificate and its key, to serve HTTPS.
    """

    out = io.StringIO()
    options = DeployOptions(
        address=address,
        reserve_gib=reserve_gib,
        http_host=HEAD_IP,
        http_port=port,
        engine="standin",
        cluster=parse_cluster(cluster, source="cluster file"),
        state_dir=Path(state_dir) if state_dir else None,
        yes=True,  # the rehearsals redeploy changed lists: they stop and move engines
        tls=TlsFiles(Path(tls[0]), Path(tls[1])) if tls else None,
    )
    registry = ModelManager([ModelConfig.model_validate(m) for m in models])
    console = Console(file=out, width=160)
    plan = deploy(registry, options, plain_lines(console), lambda plan: print_plan(console, plan))
    return Rehearsed(plan, read_reports(address, [m["model_id"] for m in models]), out.getvalue())


def read_reports(address: str, model_ids: list[str]) -> dict[str, EngineReport]:
    """Each running stand-in's `report()`, through a Serve handle to its deployment."""
    import ray
    from ray import serve

    connect(address)
    try:
        running = serve.status().applications
        reports = {}
        for model_id in model_ids:
            if model_id not in engine_apps(running):
                continue
            handle = serve.get_deployment_handle(
                ENGINE_DEPLOYMENT, app_name=current_app(running, model_id)
            )
            try:
                reports[model_id] = handle.report.remote().result(timeout_s=120)
            finally:
                handle.shutdown()
        return reports
    finally:
        ray.shutdown()


def down_all(address: str, state_dir: str | None = None) -> str:
    """`rackserve down`: remove the application and every engine."""

    out = io.StringIO()
    down(
        address,
        plain_lines(Console(file=out, width=160)),
        state_dir=Path(state_dir) if state_dir else None,
    )
    return out.getvalue()


def applications(address: str) -> dict[str, str]:
    """Serve's applications and their states."""
    import ray
    from ray import serve

    connect(address)
    try:
        return {name: str(app.status) for name, app in serve.status().applications.items()}
    finally:
        ray.shutdown()


def reconcile_standin(cluster: str, address: str, port: int, state_dir: str) -> str:
    """`rackserve reconcile --cluster FILE --state-dir DIR` once; what it printed."""
    out = io.StringIO()
    options = ReconcileOptions(
        DeployOptions(
            address=address,
            reserve_gib=0.0,
            http_host=HEAD_IP,
            http_port=port,
            engine="standin",
            cluster=parse_cluster(cluster, source="cluster file"),
            state_dir=Path(state_dir),
        ),
        grace_s=0.0,
    )
    decision = reconcile_once(options, plain_lines(Console(file=out, width=160)))
    return f"{decision.action}: {decision.reason}\n{out.getvalue()}"


def alive_nodes(address: str) -> list[str]:
    """The `rackserve/node` names of the nodes Ray shows alive."""
    import ray

    connect(address)
    try:
        return sorted(
            str(row["Labels"]["rackserve/node"])
            for row in ray.nodes()  # type: ignore[no-untyped-call]
            if row.get("Alive") and "rackserve/node" in (row.get("Labels") or {})
        )
    finally:
        ray.shutdown()


def drain_standin(
    node: str, drain: bool, cluster: str, address: str, state_dir: str, force: bool = False
) -> str:
    """`rackserve drain NODE --cluster FILE --state-dir DIR [--force]` (or `undrain`): what it
    printed, and the error it ended with, if any (`error: ...`)."""
    out = io.StringIO()
    console = Console(file=out, width=160)
    options = DeployOptions(
        address=address,
        cluster=parse_cluster(cluster, source="cluster file"),
        state_dir=Path(state_dir),
    )
    try:
        set_drained(
            node, drain, options, plain_lines(console), lambda plan: print_plan(console, plan),
            force=force,
        )  # fmt: skip
    except RackserveError as exc:
        return f"{out.getvalue()}error: {exc}"
    return out.getvalue()


def routing_views(address: str, model_ids: list[str]) -> tuple[Any, Any]:
    """What routing reads of each application, and the routes it gives, from `serve.status()`
    and from the ingress's plain reading of the controller's details, at one moment."""
    import ray
    from ray import serve

    from deployer.serving.ingress import serve_applications  # noqa: PLC0415 - imports Ray

    def facts(apps: Any) -> Any:
        seen = {
            name: (
                app_status(app),
                app.last_deployed_time_s,
                {d: dict(view.replica_states) for d, view in app.deployments.items()},
            )
            for name, app in apps.items()
        }
        return seen, serving_routes(apps, model_ids)

    connect(address)
    try:
        for _ in range(5):  # one moment: serve.status() the same before and after
            before = facts(serve.status().applications)
            plain = facts(serve_applications())
            if facts(serve.status().applications) == before:
                break
        return before, plain
    finally:
        ray.shutdown()
