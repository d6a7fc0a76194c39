"""`nox -s demo`: a rack-in-a-box bootstrapped by `rackserve bootstrap`, serving two tiny models.

`python -m tools.demo [--keep]` (root, from a checkout of the repository):

1. builds the two tiny local models (as the quickstart does) and the offline wheelhouse that
   the python_env role installs from (tools/rackbox/wheelhouse.py), both cached;
2. boots the rack-in-a-box: three Debian hosts (systemd-nspawn, each with its own IP address,
   sshd and systemd; no route out), the wheelhouse at /srv/wheelhouse, read-only;
3. runs `rackserve bootstrap -i <the rack's inventory> -e @<demo vars>`: playbooks/site.yml
   installs the Python environment, starts the Ray head and workers as systemd services, copies
   the models from this machine into the head's depot (the model_store role) and deploys them
   from the head (the deploy_models role prints the plan), staging each model's weights onto its
   node first (`weights: staged`); the demo vars pin tiny-a to worker 1 and tiny-b to worker 2;
4. asks the head's endpoint (on the bridge) for `GET /v1/models` and one chat completion per
   model, shows `rackserve status` as run on the head;
5. rehearses a GPU deployment on the same rack: the workers' Ray has 4 logical GPUs each
   (`ray_worker_logical_gpus`, set from the start; NVML sees none, so the tiny models ran on
   CPU), and `rackserve bootstrap --tags deploy_models` deploys five GPU models with the
   stand-in engine against a cluster file declaring those GPUs (tools/demo_standin.py);
   `rackserve status` and each stand-in's report show the GPUs planned and the ones Ray gave;
6. tears the rack down, unless `--keep` (then `python -m tools.rackbox down --name-prefix demo`).

Everything runs offline on this machine; the models have random weights, so their answers are
noise. Engines run on vLLM's CPU build inside the hosts, about 2.5 GiB of memory each.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import yaml

from deployer.serving.nvml_reader import read_available_memory_mib
from tools import demo_standin, rackbox
from tools.quickstart import DEFAULT_CACHE, build_models, chat, models_config
from tools.rackbox import Rack, cluster, wheelhouse

PREFIX = "demo"
NETWORK = "10.231.20.0/24"
DEPOT = "/var/lib/rackserve/depot"  # model_store_depot_dir
HTTP_PORT = 8000
RAY_PORT = 6379
NEEDS_GIB = 10  # Ray on three hosts, two engines and the ingress


def demo_vars(
    models: Sequence[str], models_dir: Path, nodes: Sequence[str], port: int
) -> dict[str, Any]:
    """The extra vars of the demo's bootstrap: the models, pinned one per node, and offline hub.

    model_store copies each model from `models_dir` (this machine, the control host) into the
    head's depot; the models are `weights: staged` from there, so rackserve copies each onto
    the node the plan places it on before its engine starts.
    """
    sources = {model_id: Path(DEPOT) / model_id for model_id in models}
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    staged = [{**model, "weights": "staged"} for model in models_config(sources, nodes)["models"]]
    return {
        "model_store_depot_dir": DEPOT,
        "model_store_models": [{"name": m, "src": str(models_dir / m)} for m in models],
        "deploy_models_enabled": True,
        "deploy_models_file": "",
        "deploy_models_models": staged,
        "deploy_models_environment": offline,
        "deploy_models_extra_args": ["--http-port", str(port)],
        "ray_head_environment": offline,
        "ray_worker_environment": offline,
    }


def _step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def _bootstrap(inventory: Path, extra_vars_file: Path, tags: str = "") -> int:
    """`rackserve bootstrap` as a user runs it; its progress goes straight to the terminal."""
    args = ["bootstrap", "-i", str(inventory), "-e", f"@{extra_vars_file}"]
    if tags:
        args += ["--tags", tags]
    print(f"$ rackserve {shlex.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "deployer", *args], check=False)
    return done.returncode


def _serve_requests(base_url: str, models: Sequence[str]) -> None:
    print(f"\nGET {base_url}/v1/models", flush=True)
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=60) as response:
        listed = json.loads(response.read())
    print(json.dumps(listed), flush=True)
    served = sorted(m["id"] for m in listed["data"])
    if served != sorted(models):
        raise RuntimeError(f"/v1/models lists {served}, expected {sorted(models)}")
    for model_id in models:
        answer = chat(base_url, model_id)
        text = answer["choices"][0]["message"]["content"]
        print(f"\nPOST {base_url}/v1/chat/completions model={model_id}\n  -> {text!r}", flush=True)


def _prepare(
    cache: Path, wheelhouse: Any, timings: dict[str, float]
) -> tuple[list[str], Path, Any]:
    """The tiny models (built once) and the wheelhouse (built once)."""
    _step("Tiny models and the offline wheelhouse")
    started = time.monotonic()
    sources = build_models(cache)
    models_dir = next(iter(sources.values())).parent
    timings["models"] = time.monotonic() - started
    print(f"models {', '.join(sources)} in {models_dir} ({timings['models']:.1f} s)", flush=True)
    house = wheelhouse.ensure_wheelhouse()
    timings["wheelhouse"] = house.timings["total_s"]
    print(house.describe(), flush=True)
    return list(sources), models_dir, house


def _query(rack: Rack, models: Sequence[str], port: int) -> int:
    """The endpoint's answers, and `rackserve status` on the head; the exit code."""
    _step("The endpoint on the head")
    head = rack.hosts[0]
    try:
        _serve_requests(f"http://{head.ip}:{port}", models)
    except (OSError, RuntimeError, KeyError) as exc:  # HTTPError and URLError are OSErrors
        body = exc.read().decode(errors="replace") if isinstance(exc, HTTPError) else ""
        print(f"demo: the endpoint failed: {exc}\n{body[-3000:]}", file=sys.stderr)
        return 1
    command = f"rackserve status --address {head.ip}:{RAY_PORT}"
    status = rack.ssh(head, command, check=False)
    print(f"\n$ ssh root@{head.ip} {command}\n{status.stdout}{status.stderr}", flush=True)
    return 0


def _standin(rack: Rack, port: int) -> int:
    """The stand-in engine on the workers' logical GPUs; the exit code."""
    _step(f"The stand-in engine on {demo_standin.LOGICAL_GPUS} logical GPUs per worker")
    workers = [host.name for host in rack.hosts[1:]]
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    extra = rack.spec.rack_dir / "standin-vars.yml"
    extra.write_text(
        yaml.safe_dump(demo_standin.standin_vars(workers, port, offline), sort_keys=False)
    )
    code = _bootstrap(rack.inventory, extra, tags="deploy_models")
    if code != 0:
        print(f"demo: the stand-in deployment failed (exit {code})", file=sys.stderr)
        return 1
    head = rack.hosts[0]
    command = f"rackserve status --address {head.ip}:{RAY_PORT}"
    status = rack.ssh(head, command, check=False)
    print(f"\n$ ssh root@{head.ip} {command}\n{status.stdout}{status.stderr}", flush=True)
    done = rack.ssh(head, demo_standin.reports_command(head.ip, RAY_PORT), check=False)
    try:
        found = demo_standin.parse_reports(done.stdout)
    except ValueError:
        print(f"demo: no stand-in reports from {head.name}:\n{done.stderr[-3000:]}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0 if demo_standin.show_reports(found) else 1


def run(keep: bool, cache: Path, port: int) -> int:
    """The demo; returns the exit code."""
    timings: dict[str, float] = {}
    try:
        rackbox.check_machine()
    except rackbox.RackUnavailable as exc:
        print(f"demo: this machine cannot run the rack-in-a-box: {exc}", file=sys.stderr)
        return 2
    available_gib = read_available_memory_mib() / 1024
    if available_gib < NEEDS_GIB:
        print(f"demo: warning: {available_gib:.1f} GiB of memory available; "
              f"the demo needs about {NEEDS_GIB} GiB", file=sys.stderr, flush=True)  # fmt: skip
    models, models_dir, house = _prepare(cache, wheelhouse, timings)

    _step("Rack-in-a-box: 3 hosts")
    rack: Rack = rackbox.Rack(
        3,
        prefix=PREFIX,
        network=NETWORK,
        wheelhouse=house.path,
        inventory_vars={**cluster.RAY_VARS, **demo_standin.INVENTORY_VARS},
        prefetch=cluster.SITE_DEBS,
        replace=True,
        keep=True,
        stop_timeout_s=10,  # then the hosts are killed: nothing to drain in a demo
    )
    try:
        rack.up()
        timings["boot"] = rack.timings["up_s"]
        for host in rack.hosts:
            print(f"  {host.name:<16} {host.ip:<14} {host.role}", flush=True)
        extra = rack.spec.rack_dir / "demo-vars.yml"
        workers = [host.name for host in rack.hosts[1:]]
        variables = demo_vars(models, models_dir, workers, port)
        extra.write_text(yaml.safe_dump(variables, sort_keys=False))

        _step("rackserve bootstrap: site.yml, models pinned to the two workers")
        started = time.monotonic()
        code = _bootstrap(rack.inventory, extra)
        timings["bootstrap"] = time.monotonic() - started
        if code != 0:
            print(f"demo: rackserve bootstrap failed (exit {code})", file=sys.stderr)
            return 1
        started = time.monotonic()
        if _query(rack, models, port) != 0:
            return 1
        timings["requests"] = time.monotonic() - started
        started = time.monotonic()
        if _standin(rack, port) != 0:
            return 1
        timings["standin"] = time.monotonic() - started
    finally:
        if keep:
            head = rack.hosts[0].ip
            print(f"\nThe rack is still up (--keep): endpoint http://{head}:{port}/v1, inventory "
                  f"{rack.inventory}\n  ssh -i {rack.private_key} root@{head}\n"
                  f"  python -m tools.rackbox down --name-prefix {PREFIX}", flush=True)  # fmt: skip
        else:
            _step("Teardown")
            rack.down()
            timings["teardown"] = rack.timings["teardown_s"]
    print("\ndemo done: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options and run the demo."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--keep", action="store_true", help="leave the rack running at the end")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"models cache (default {DEFAULT_CACHE})"
    )
    parser.add_argument("--port", type=int, default=HTTP_PORT, help="the endpoint's HTTP port")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run(args.keep, args.cache, args.port)


if __name__ == "__main__":
    sys.exit(main())
