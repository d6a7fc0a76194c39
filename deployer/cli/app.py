"""The `rackserve` command line.

Exit codes: 0 success; 1 the environment failed; 2 bad input (nothing planned or launched);
3 some model could not be placed (nothing launched); 4 (`status`) something deployed is not
serving.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from deployer import __version__
from deployer.cli.keys import keys_app
from deployer.cli.options import (
    check_output_target,
    print_error,
    require,
    reserve_gib,
    write_output,
)
from deployer.cli.render import (
    cluster_table,
    diff_table,
    estimates_table,
    events_table,
    plain_lines,
    print_plan,
    status_table,
    top_rows,
    top_table,
)
from deployer.config.cluster import dump_cluster, load_cluster
from deployer.config.models_config import load_models
from deployer.errors import ConfigError, ExitCode, RackserveError
from deployer.planning.placement import DEFAULT_RESERVE_GIB
from deployer.planning.serve_config import APP_NAME, DEFAULT_HTTP_HOST, DEFAULT_HTTP_PORT
from deployer.planning.workflow import plan_models
from deployer.serving.ray_token import use_rack_token
from deployer.sources.estimates import estimate_models

app = typer.Typer(
    name="rackserve",
    help="Plan and serve many LLMs on the GPUs of an on-prem rack.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(keys_app)
# Wide enough for the tables when output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 132)
errors = Console(stderr=True)

ModelsOption = Annotated[
    Path | None,
    typer.Option(
        "--models",
        "-m",
        help="Models file (YAML or JSON, top-level `models:` list). "
        "Default: $MODELS_CONFIG, then $MODEL_ID.",
        dir_okay=False,
    ),
]
ReserveOption = Annotated[
    float,
    typer.Option(
        help="GiB held back on every GPU (and CPU node); 0 uses all free memory.",
        callback=reserve_gib,
    ),
]
JsonOption = Annotated[
    str | None,
    typer.Option("--json", help="Also write the result as JSON to this file ('-' for stdout)."),
]


def _write_json(target: str, document: dict[str, Any] | list[Any]) -> None:
    _write_text(target, json.dumps(document, indent=2) + "\n")


def _write_text(target: str, text: str) -> None:
    if target == "-":
        sys.stdout.write(text)
    else:
        write_output(target, text)


def _version(value: bool) -> None:
    if value:
        console.print(f"rackserve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Plan and serve many LLMs on the GPUs of an on-prem rack."""


@app.command()
def estimate(models: ModelsOption = None, json_out: JsonOption = None) -> None:
    """Estimate each model's memory per GPU: weights, KV cache, overhead."""
    check_output_target(json_out)
    registry = load_models(models)
    estimates = estimate_models(registry)
    if json_out != "-":
        console.print(estimates_table(estimates))
    if json_out:
        _write_json(json_out, [e.as_json() for e in estimates])


@app.command()
def plan(
    cluster: Annotated[
        Path | None,
        typer.Option(
            "--cluster",
            "-c",
            help="Cluster file (YAML or JSON), as `probe` writes (required unless "
            "--against-running, which probes when it is not given).",
            dir_okay=False,
        ),
    ] = None,
    models: ModelsOption = None,
    json_out: JsonOption = None,
    reserve_gib: ReserveOption = DEFAULT_RESERVE_GIB,
    full: Annotated[
        bool,
        typer.Option(
            "--full", help="One row per model and per GPU even at rack scale (default: by node)."
        ),
    ] = False,
    against_running: Annotated[
        bool,
        typer.Option(
            "--against-running",
            help="Plan against what the Ray cluster at --address runs and print, per model, "
            "keep, start, stop, restart or move (`deploy --diff`); needs Ray.",
        ),
    ] = False,
    address: AddressOption = "auto",
    state_dir: StateDirOption = None,
) -> None:
    """Place the models on the cluster's GPUs; exit 3 if some model does not fit."""
    check_output_target(json_out)
    registry = load_models(models)
    if against_running:
        _deploy_diff(registry, address, cluster, reserve_gib, state_dir)
        return
    if cluster is None:
        raise ConfigError(
            ["plan needs --cluster FILE (as `rackserve probe --json` writes), or "
             "--against-running to plan against the Ray cluster at --address"],
            source="command line",
        )  # fmt: skip
    the_cluster = load_cluster(cluster)
    result = plan_models(the_cluster, registry, estimate_models(registry), reserve_gib)
    if json_out != "-":
        print_plan(console, result, full=full)
    if json_out:
        _write_json(json_out, result.as_json())
    if result.unplaced:
        raise typer.Exit(ExitCode.UNPLACED)


AddressOption = Annotated[
    str,
    typer.Option(
        "--address",
        "-a",
        envvar="RAY_ADDRESS",
        help="Ray cluster: HOST:PORT (GCS), ray://HOST:10001 (Ray Client) or 'auto'.",
    ),
]


ClusterFileOption = Annotated[
    Path | None,
    typer.Option(
        "--cluster",
        "-c",
        help="Plan on this cluster file instead of probing (logical GPUs: NVML finds none); "
        "each node must be a Ray node labelled rackserve/node=NAME with at least its GPUs.",
        dir_okay=False,
    ),
]


def state_dir_or_default(given: Path | None) -> Path | None:
    """`--state-dir`, else the head's state directory when this host has one."""
    from deployer.serving.state import DEFAULT_STATE_DIR  # noqa: PLC0415

    if given is not None:
        return given
    return DEFAULT_STATE_DIR if DEFAULT_STATE_DIR.is_dir() else None


StateDirOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        envvar="RACKSERVE_STATE_DIR",
        help="Keep what was deployed, an event log and a lock in this directory. Default: "
        "/var/lib/rackserve/state when it exists (the head's, made by the deploy_models role), "
        "so that a deploy or down run there by hand is what the controller restores.",
        file_okay=False,
    ),
]


@app.command()
def probe(address: AddressOption = "auto", json_out: JsonOption = None) -> None:
    """Probe every Ray node's GPUs (NVML) or memory; write the cluster file `plan` reads."""
    check_output_target(json_out)
    require("ray", "probe")
    from deployer.serving.probe import probe_cluster  # noqa: PLC0415 - needs Ray

    cluster = probe_cluster(address)
    if json_out != "-":
        console.print(cluster_table(cluster))
    if json_out:
        _write_text(json_out, dump_cluster(cluster))


AllowDowntimeOption = Annotated[
    bool,
    typer.Option(
        "--allow-downtime",
        help="When a restarted or moved model's new engine has no room beside the old one, "
        "stop the old one first (the model answers 503 until the new one serves).",
    ),
]
HttpHostOption = Annotated[
    str,
    typer.Option(
        "--http-host",
        help="Address the OpenAI endpoint listens on. 0.0.0.0: every node's port serves it "
        "(a proxy per node); a specific address: the head's proxy only.",
    ),
]
HttpPortOption = Annotated[
    int, typer.Option("--http-port", min=1, max=65535, help="Port of the OpenAI endpoint.")
]
ApiKeysOption = Annotated[
    Path | None,
    typer.Option(
        "--api-keys",
        help="The API key file on the head that the endpoint checks (`rackserve keys`). "
        "Default: /etc/rackserve/api-keys.json when it exists.",
        dir_okay=False,
    ),
]
SslCertOption = Annotated[
    Path | None,
    typer.Option(
        "--ssl-certfile",
        help="Serve HTTPS with this PEM certificate (chain); with --ssl-keyfile. With "
        "--http-host 0.0.0.0, every Ray node needs it at this path.",
        dir_okay=False,
    ),
]
SslKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--ssl-keyfile", help="The certificate's PEM private key (unencrypted).", dir_okay=False
    ),
]
NoAuthOption = Annotated[
    bool,
    typer.Option(
        "--no-auth",
        help="Serve without API keys, on purpose: anyone reaching the port may use every model "
        "(without keys or this, deploy refuses).",
    ),
]
NO_KEYS = (
    "the endpoint has no API keys: anyone who reaches its port may use every model. Add a key "
    "with `rackserve keys add NAME --models ID,...` and deploy again with it"
)


def api_key_file(given: Path | None, no_auth: bool) -> Path | None:
    """The key file a deploy asks the endpoint to check, read here first; None: no keys."""
    from deployer.serving.key_file import DEFAULT_KEY_FILE, read_keys  # noqa: PLC0415

    if no_auth:
        if given is not None:
            raise ConfigError("--api-keys and --no-auth contradict each other: give one")
        return None
    path = given or (DEFAULT_KEY_FILE if DEFAULT_KEY_FILE.exists() else None)
    if path is None:
        raise ConfigError(
            f"no API keys: {DEFAULT_KEY_FILE} does not exist and --api-keys was not given, so "
            "the endpoint would be open to anyone who reaches its port; nothing was deployed. "
            "Add a key with `rackserve keys add NAME --models '*'` (it writes that file), give "
            "--api-keys FILE, or pass --no-auth to serve without keys on purpose"
        )
    read_keys(path)  # a missing, unreadable, open or broken file: refused before any change
    return path.absolute()


@app.command()
def deploy(
    models: ModelsOption = None,
    address: AddressOption = "auto",
    plan_only: Annotated[
        bool, typer.Option("--plan-only", help="Probe, plan and print the plan; launch nothing.")
    ] = False,
    allow_partial: Annotated[
        bool, typer.Option("--allow-partial", help="Launch the models that fit even if some don't.")
    ] = False,
    reserve_gib: ReserveOption = DEFAULT_RESERVE_GIB,
    http_host: HttpHostOption = DEFAULT_HTTP_HOST,
    http_port: HttpPortOption = DEFAULT_HTTP_PORT,
    engine: Annotated[
        Literal["vllm", "standin"],
        typer.Option(
            "--engine",
            help="vllm serves the models; standin rehearses the launch on the same GPUs and "
            "bundles with a stand-in that serves nothing (dry runs, logical GPUs).",
        ),
    ] = "vllm",
    cluster: ClusterFileOption = None,
    state_dir: StateDirOption = None,
    diff: Annotated[
        bool,
        typer.Option(
            "--diff",
            help="Print what deploying would do to each model (keep, start, stop, restart, "
            "move, and why); launch nothing.",
        ),
    ] = False,
    yes: Annotated[
        bool,
        typer.Option(
            "--yes",
            "-y",
            help="Stop, restart or move running models without asking (needed without a terminal).",
        ),
    ] = False,
    allow_downtime: AllowDowntimeOption = False,
    rebalance: Annotated[
        bool,
        typer.Option(
            "--rebalance",
            help="Plan every model afresh (fewest GPUs, then fewest nodes) instead of keeping "
            "running models where they are; those that move start beside their old engines.",
        ),
    ] = False,
    api_keys: ApiKeysOption = None,
    no_auth: NoAuthOption = False,
    ssl_certfile: SslCertOption = None,
    ssl_keyfile: SslKeyOption = None,
) -> None:
    """Probe, plan and launch the models: an engine application each, one OpenAI endpoint.

    Prints the plan and, per model, keep, start, stop, restart or move. When a running model
    would stop, restart or move, it asks first on a terminal; without one it refuses (exit 2)
    unless --yes. A restarted or moved model's new engine starts beside the old one, which
    stops once the new one serves; with no room for both it refuses (exit 3) unless
    --allow-downtime.
    """
    require("ray.serve", "deploy")
    if diff:
        _deploy_diff(load_models(models), address, cluster, reserve_gib, state_dir)
        return
    from deployer.serving.launch import DeployOptions  # noqa: PLC0415 - needs Ray
    from deployer.serving.launch import deploy as run_deploy  # noqa: PLC0415
    from deployer.serving.tls import load_tls  # noqa: PLC0415

    registry = load_models(models)
    tls = load_tls(ssl_certfile, ssl_keyfile)
    keys = None if plan_only else api_key_file(api_keys, no_auth)
    options = DeployOptions(
        address,
        plan_only,
        allow_partial,
        reserve_gib,
        http_host,
        http_port,
        engine=engine,
        cluster=load_cluster(cluster) if cluster else None,
        state_dir=state_dir_or_default(state_dir),
        yes=yes,
        allow_downtime=allow_downtime,
        rebalance=rebalance,
        api_keys=keys,
        tls=tls,
    )
    run_deploy(
        registry,
        options,
        plain_lines(console),
        lambda plan: print_plan(console, plan),
        on_diff=lambda changes: console.print(diff_table(changes)),
        confirm=_confirm_on_terminal,
    )


@app.command()
def stage(
    models: ModelsOption = None,
    address: AddressOption = "auto",
    allow_partial: Annotated[
        bool, typer.Option("--allow-partial", help="Stage the models that fit even if some don't.")
    ] = False,
    reserve_gib: ReserveOption = DEFAULT_RESERVE_GIB,
    cluster: ClusterFileOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Copy the weights of `weights: staged` models onto the nodes the next deploy places them.

    Plans as `deploy` would (running models stay where they are), then, on each placed node,
    copies `model_source` (a local checkpoint directory, or a repo on the hub mirror at
    HF_ENDPOINT, which each node downloads) into `store_dir` and verifies it (space checked
    first; a second run copies nothing); `weights: shared` copies are verified in place.
    Launches nothing. `deploy` stages by itself before engines start; this does it ahead, e.g.
    before a maintenance window.
    """
    require("ray.serve", "stage")
    from deployer.serving.launch import DeployOptions  # noqa: PLC0415 - needs Ray
    from deployer.serving.launch import deploy as run_deploy  # noqa: PLC0415

    options = DeployOptions(
        address,
        allow_partial=allow_partial,
        reserve_gib=reserve_gib,
        cluster=load_cluster(cluster) if cluster else None,
        state_dir=state_dir_or_default(state_dir),
        stage_only=True,
    )
    run_deploy(
        load_models(models), options, plain_lines(console), lambda plan: print_plan(console, plan)
    )


NodeArgument = Annotated[
    str, typer.Argument(help="The node's name: its rackserve/node label, as `status` shows it.")
]


@app.command()
def drain(
    node: NodeArgument,
    address: AddressOption = "auto",
    state_dir: StateDirOption = None,
    cluster: ClusterFileOption = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Drain even when some model finds no room elsewhere: it stops and is "
            "reported unplaced.",
        ),
    ] = False,
    allow_downtime: AllowDowntimeOption = False,
) -> None:
    """Take a node out of service: its models move elsewhere, and every later plan avoids it.

    Each model's new engine starts before its old one stops, so no request fails. Durable: the
    drain is kept in the deployed record (and the state directory) until `undrain`. Refuses
    (exit 3, nothing changed) when a model would find no room, unless --force.
    """
    _set_drained(node, True, address, state_dir, cluster, force, allow_downtime)


@app.command()
def undrain(
    node: NodeArgument,
    address: AddressOption = "auto",
    state_dir: StateDirOption = None,
    cluster: ClusterFileOption = None,
) -> None:
    """Put a drained node back in service; running models stay where they are."""
    _set_drained(node, False, address, state_dir, cluster)


def _set_drained(
    node: str,
    drained: bool,
    address: str,
    state_dir: Path | None,
    cluster: Path | None,
    force: bool = False,
    allow_downtime: bool = False,
) -> None:
    require("ray.serve", "drain" if drained else "undrain")
    from deployer.serving.launch import DeployOptions, set_drained  # noqa: PLC0415 - needs Ray

    options = DeployOptions(
        address,
        cluster=load_cluster(cluster) if cluster else None,
        state_dir=state_dir_or_default(state_dir),
        allow_downtime=allow_downtime,
    )
    set_drained(
        node,
        drained,
        options,
        plain_lines(console),
        lambda plan: print_plan(console, plan),
        on_diff=lambda changes: console.print(diff_table(changes)),
        force=force,
    )


def _confirm_on_terminal(changes: Sequence[Any]) -> bool:
    """Ask on the terminal whether to interrupt `changes`; False without a terminal."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return False
    return typer.confirm(f"Interrupt {len(changes)} running model(s) as shown above?")


def _deploy_diff(
    registry: Any, address: str, cluster: Path | None, reserve_gib: float, state_dir: Path | None
) -> None:
    """`deploy --diff` and `plan --against-running`: the plan against what runs, per model."""
    require("ray.serve", "deploy --diff")
    from deployer.serving.launch import DeployOptions  # noqa: PLC0415 - needs Ray
    from deployer.serving.launch import deploy as run_deploy  # noqa: PLC0415

    options = DeployOptions(
        address,
        plan_only=True,
        allow_partial=True,
        reserve_gib=reserve_gib,
        cluster=load_cluster(cluster) if cluster else None,
        state_dir=state_dir_or_default(state_dir),
    )
    run_deploy(
        registry,
        options,
        plain_lines(console),
        lambda plan: None,
        on_diff=lambda changes: console.print(diff_table(changes)),
    )


GraceOption = Annotated[
    float,
    typer.Option(
        "--grace-s",
        min=0,
        max=86_400,
        help="A node gone this long has its models re-placed; a node back (or new) gets "
        "models once up this long.",
    ),
]
JoinTimeoutOption = Annotated[
    float,
    typer.Option(
        "--join-timeout-s",
        min=0,
        max=86_400,
        help="After a cold start, how long to wait for the nodes last used.",
    ),
]


StartTimeoutOption = Annotated[
    float,
    typer.Option(
        "--start-timeout-s",
        min=1,
        max=86_400,
        help="An engine not running this long after its start is removed and started afresh "
        "by the next pass (a placement Ray never schedules would block the controller).",
    ),
]


def _reconcile_options(
    address: str,
    state_dir: Path | None,
    cluster: Path | None,
    grace_s: float,
    join_timeout_s: float,
    start_timeout_s: float,
) -> Any:
    from deployer.serving.launch import DeployOptions  # noqa: PLC0415 - needs Ray
    from deployer.serving.reconcile import ReconcileOptions  # noqa: PLC0415

    deploy_options = DeployOptions(
        address,
        cluster=load_cluster(cluster) if cluster else None,
        state_dir=state_dir_or_default(state_dir),
        start_timeout_s=start_timeout_s,
    )
    return ReconcileOptions(deploy_options, grace_s=grace_s, join_timeout_s=join_timeout_s)


@app.command()
def reconcile(
    address: AddressOption = "auto",
    state_dir: StateDirOption = None,
    cluster: ClusterFileOption = None,
    grace_s: GraceOption = 60.0,
    join_timeout_s: JoinTimeoutOption = 300.0,
    start_timeout_s: StartTimeoutOption = 900.0,
) -> None:
    """One pass: bring back what was deployed (a cold start, a lost node), then exit."""
    require("ray.serve", "reconcile")
    from deployer.serving.reconcile import reconcile_once  # noqa: PLC0415 - needs Ray

    options = _reconcile_options(
        address, state_dir, cluster, grace_s, join_timeout_s, start_timeout_s
    )
    decision = reconcile_once(options, plain_lines(console))
    plain_lines(console)(f"{decision.action}: {decision.reason}")


@app.command()
def controller(
    address: AddressOption = "auto",
    state_dir: StateDirOption = None,
    cluster: ClusterFileOption = None,
    grace_s: GraceOption = 60.0,
    join_timeout_s: JoinTimeoutOption = 300.0,
    start_timeout_s: StartTimeoutOption = 900.0,
    interval_s: Annotated[
        float, typer.Option("--interval-s", min=1, max=3_600, help="Seconds between passes.")
    ] = 10.0,
    metrics_port: Annotated[
        int,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65_535,
            help="Serve the plan's Prometheus gauges on this port (0: off).",
        ),
    ] = 0,
    metrics_address: Annotated[
        str, typer.Option("--metrics-address", help="Address the metrics port listens on.")
    ] = "127.0.0.1",
) -> None:
    """Reconcile passes forever (the head's rackserve-controller service)."""
    require("ray.serve", "controller")
    from deployer.serving.exporter import serve_metrics  # noqa: PLC0415 - needs prometheus_client
    from deployer.serving.reconcile import run_controller  # noqa: PLC0415 - needs Ray

    options = _reconcile_options(
        address, state_dir, cluster, grace_s, join_timeout_s, start_timeout_s
    )
    seen = None
    if metrics_port:
        try:
            seen = serve_metrics(metrics_port, metrics_address).seen
        except OSError as exc:
            raise RackserveError(
                f"cannot serve metrics on {metrics_address}:{metrics_port}: {exc.strerror}; "
                "pick a free port (--metrics-port) or an address of this host (--metrics-address)"
            ) from exc
    run_controller(options, plain_lines(console), interval_s=interval_s, seen=seen)


@app.command()
def status(
    address: AddressOption = "auto", state_dir: StateDirOption = None, json_out: JsonOption = None
) -> None:
    """Each deployed model's node, GPUs, state, health and memory; exit 4 if any is not serving.

    Memory: what the plan booked against what the engine holds (NVML per process on GPUs,
    resident memory on CPU nodes), flagged "over booking" or "wasted" (far under it).
    """
    require("ray.serve", "status")
    check_output_target(json_out)
    from deployer.serving.engine_memory import memory_drift  # noqa: PLC0415 - needs Ray
    from deployer.serving.launch import deployment_status  # noqa: PLC0415 - needs Ray
    from deployer.serving.state import FileStateStore  # noqa: PLC0415

    state_dir = state_dir_or_default(state_dir)
    shown = deployment_status(address, state_dir=state_dir)
    statuses = shown.models
    drifts = memory_drift(address, state_dir=state_dir) if statuses else []
    events = FileStateStore(state_dir).events() if state_dir else []
    if json_out:
        models = [
            dataclasses.asdict(s)
            | {"memory": [dataclasses.asdict(d) for d in drifts if d.model_id == s.model_id]}
            for s in statuses
        ]
        _write_json(
            json_out,
            {
                "models": models,
                "drained": shown.drained,
                "api_keys": shown.api_keys,
                "tls": shown.tls,
                "events": events,
            },
        )
    if json_out != "-":  # on stdout, the JSON is all
        if events:
            console.print(events_table(events))
        if statuses:
            console.print(status_table(statuses, drifts))
        else:
            console.print(f"no {APP_NAME!r} application is deployed")
        if shown.drained:
            console.print(f"drained (no model is placed there): {', '.join(shown.drained)}")
        if statuses and shown.api_keys is None:
            errors.print(f"warning: {NO_KEYS}")
    if not all(s.healthy for s in statuses):
        raise typer.Exit(ExitCode.NOT_SERVING)


@app.command()
def top(
    address: AddressOption = "auto",
    state_dir: StateDirOption = None,
    prometheus: Annotated[
        str | None,
        typer.Option(
            "--prometheus",
            help="Read the engines' series from this Prometheus (e.g. http://HEAD:9090); "
            "default: every Ray node's metrics endpoint.",
        ),
    ] = None,
    interval_s: Annotated[
        float,
        typer.Option("--interval-s", min=0.5, max=300, help="Seconds between two readings."),
    ] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="One view, then exit.")] = False,
    json_out: JsonOption = None,
) -> None:
    """Per model: node, state, requests, req/s, tokens/s, TTFT, running/waiting, KV cache %."""
    require("ray.serve", "top")
    check_output_target(json_out)
    from rich.live import Live  # noqa: PLC0415

    from deployer.planning.model_load import model_loads  # noqa: PLC0415
    from deployer.serving import metrics_reader  # noqa: PLC0415 - needs Ray
    from deployer.serving.launch import model_statuses  # noqa: PLC0415

    state_dir = state_dir_or_default(state_dir)
    read = (
        metrics_reader.prometheus_reader(prometheus)
        if prometheus
        else metrics_reader.endpoint_reader(metrics_reader.metrics_endpoints(address))
    )

    def view() -> list[dict[str, Any]]:
        before, started = read(), time.monotonic()
        time.sleep(interval_s)
        after = read()
        loads = model_loads(before, after, time.monotonic() - started)
        return top_rows(model_statuses(address, state_dir=state_dir), loads)

    if once or json_out:
        rows = view()
        if json_out:
            _write_json(json_out, {"interval_s": interval_s, "models": rows})
        if json_out != "-":
            console.print(top_table(rows, interval_s))
        return
    with Live(console=console, auto_refresh=False) as live:
        while True:  # until ^C
            live.update(top_table(view(), interval_s), refresh=True)


@app.command()
def down(address: AddressOption = "auto", state_dir: StateDirOption = None) -> None:
    """Remove every model's engine application and the endpoint (the ingress application)."""
    require("ray.serve", "down")
    from deployer.serving.launch import down as run_down  # noqa: PLC0415 - needs Ray

    run_down(address, plain_lines(console), state_dir=state_dir_or_default(state_dir))


@app.command()
def bootstrap(
    inventory: Annotated[
        Path, typer.Option("--inventory", "-i", help="The rack's inventory (hosts.yml).")
    ],
    playbook: Annotated[
        str,
        typer.Option(
            "--playbook",
            "-p",
            help="site (bootstrap), reset (tear down), scale (add workers), remove-node "
            "(-e node=NAME) or upgrade (rolling).",
        ),
    ] = "site",
    limit: Annotated[
        str | None, typer.Option("--limit", "-l", help="Only these hosts or groups.")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Report what would change; change nothing.")
    ] = False,
    syntax_check: Annotated[
        bool,
        typer.Option("--syntax-check", help="Only parse the playbook and roles; reach no host."),
    ] = False,
    extra_vars: Annotated[
        list[str] | None,
        typer.Option("--extra-vars", "-e", help="KEY=VALUE (YAML value) or @FILE; repeatable."),
    ] = None,
    tags: Annotated[
        str | None,
        typer.Option("--tags", "-t", help="Only these steps, e.g. ray_worker,ray_firewall."),
    ] = None,
    skip_tags: Annotated[
        str | None, typer.Option("--skip-tags", help="All steps but these, e.g. models.")
    ] = None,
    vault_password_file: Annotated[
        Path | None,
        typer.Option(
            "--vault-password-file",
            help="Decrypts the inventory's and -e files' vault values (as ansible-playbook).",
        ),
    ] = None,
    ask_vault_pass: Annotated[
        bool, typer.Option("--ask-vault-pass", help="Ask for the vault password.")
    ] = False,
) -> None:
    """Bootstrap the rack with Ansible (playbooks/site.yml) and show live progress."""
    from deployer.bootstrap.runner import (  # noqa: PLC0415 - ansible
        BOOTSTRAP_HINT,
        parse_extravars,
        run_playbook,
    )

    require("ansible_runner", "bootstrap", BOOTSTRAP_HINT)
    if ask_vault_pass and vault_password_file is not None:
        raise ConfigError(
            "--ask-vault-pass and --vault-password-file both give the vault password: pass one",
            source="--ask-vault-pass",
        )
    extra = parse_extravars(extra_vars or [])
    password = getpass.getpass("Vault password: ") if ask_vault_pass else None
    result = run_playbook(
        inventory,
        playbook,
        extra.values,
        limit,
        check,
        console,
        tags=tags,
        skip_tags=skip_tags,
        syntax_check=syntax_check,
        vault_files=extra.vault_files,
        vault_password_file=vault_password_file,
        vault_password=password,
    )
    if not result.ok:
        raise typer.Exit(ExitCode.FAILURE)


def main(argv: list[str] | None = None) -> None:
    """Run the command line; expected errors print one message and exit with their code.

    Usage errors (a missing or malformed option) exit 2 through click, like bad input.
    """
    use_rack_token()  # before anything imports Ray, which reads the mode once
    try:
        app(args=argv, prog_name="rackserve")
    except RackserveError as exc:
        print_error(errors, exc)
        sys.exit(exc.exit_code)
