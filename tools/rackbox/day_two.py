"""Day-2 steps on a rack-in-a-box serving stand-in engines: what the lifecycle tests
(tests/rack/test_lifecycle.py) and `nox -s bench_bootstrap` share.

The inventory's workers are declared CPU nodes in deploy_models' cluster file (the head takes
no engine), so the stand-in engine is placed on them without GPUs. `rackserve` runs on the head,
against its Ray and the state directory its controller shares. A step runs while a client loop
asks every model through the head's endpoint, and comes back with its wall time and every
request's answer, per model.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.client_loop import ClientLoop, Counts
from tools.rackbox.cluster import RAY_PORT, RAY_VARS
from tools.rackbox.rack import Rack
from tools.rackbox.spec import HostSpec
from tools.rackbox.wheelhouse import build_rackserve_wheel

MODELS = ("a", "b")
SERVE_PORT = 8000
STATE_DIR = "/var/lib/rackserve/state"
CLUSTER_PATH = "/etc/rackserve/cluster.yaml"
UPGRADE_VERSION = "0.1.0.post1"
UPGRADE_MOUNT = "/srv/upgrade"
UPGRADE_VARS: dict[str, Any] = {
    "python_env_rackserve_requirement": f"rackserve=={UPGRADE_VERSION}",
    "python_env_pip_extra_args": ["--find-links", UPGRADE_MOUNT],
    "python_env_uv_extra_args": ["--find-links", UPGRADE_MOUNT],
}
"""python_env's variables that install the bumped rackserve (bind-mounted at UPGRADE_MOUNT)."""


def cluster_file(workers: Sequence[HostSpec]) -> dict[str, Any]:
    """The workers as CPU nodes (the head takes no engine): deploy_models' cluster file."""
    return {"nodes": [{"name": w.name, "gpus": [], "cpu_memory_mib": 6144} for w in workers]}


def standin_vars(workers: Sequence[HostSpec], models: Sequence[str] = MODELS) -> dict[str, Any]:
    """Inventory variables: Ray, and deploy_models serving `models` with the stand-in engine."""
    return {
        **RAY_VARS,
        "ray_worker_num_cpus": 4,  # each engine replica holds a Ray CPU; the hosts have 2 cores
        "deploy_models_engine": "standin",
        "deploy_models_models": models_config(models)["models"],
        "deploy_models_cluster": cluster_file(workers),
        "deploy_models_controller_grace_s": 10,
        "deploy_models_controller_interval_s": 5,
    }


def models_config(models: Sequence[str], gib: Mapping[str, float] | None = None) -> dict[str, Any]:
    """A models file serving `models`: `gib[model]` each on a CPU node, else 2 GiB."""
    sizes = gib or {}
    return {"models": [{"model_id": m, "gpu_memory_gib": sizes.get(m, 2)} for m in models]}


@contextlib.contextmanager
def upgrade_wheels(python: str) -> Iterator[Path]:
    """A directory holding rackserve's wheel with version UPGRADE_VERSION, for `binds`."""
    with tempfile.TemporaryDirectory(prefix="rackserve-upgrade-") as scratch:
        built = build_rackserve_wheel(python, Path(scratch) / "build", version=UPGRADE_VERSION)
        if UPGRADE_VERSION not in built.name:
            raise RuntimeError(f"the bumped wheel has the wrong version: {built.name}")
        wheels = Path(scratch) / "wheels"
        wheels.mkdir()
        built.rename(wheels / built.name)
        yield wheels


def head_command(rack: Rack, *argv: str, check: bool = True) -> Any:
    """`rackserve ARGV --address HEAD --state-dir ...` on the head."""
    head = rack.hosts[0]
    line = shlex.join(
        ["rackserve", *argv, "--address", f"{head.ip}:{RAY_PORT}", "--state-dir", STATE_DIR]
    )
    return rack.ssh(head, line, check=check, timeout=600)


def deploy(rack: Rack, models: Sequence[str], gib: Mapping[str, float] | None = None) -> Any:
    """`rackserve deploy --yes` of `models` (see models_config) with the stand-in engine, from
    the head."""
    path = "/etc/rackserve/day-two-models.json"
    config = json.dumps(models_config(models, gib))
    rack.ssh(rack.hosts[0], f"cat > {path} <<'EOF'\n{config}\nEOF")
    return head_command(
        rack,
        "deploy",
        "--models",
        path,
        "--engine",
        "standin",
        "--cluster",
        CLUSTER_PATH,
        "--yes",
        "--no-auth",
    )


def status(rack: Rack) -> dict[str, Any]:
    """`rackserve status --json` from the head."""
    shown = head_command(rack, "status", "--json", "-", check=False)
    document: dict[str, Any] = json.loads(shown.stdout)
    return document


def placed(rack: Rack) -> dict[str, str]:
    """Per model, the node the head's state directory places it on."""
    shown = rack.ssh(rack.hosts[0], f"cat {STATE_DIR}/deployed.json").stdout
    return {p["model_id"]: p["node"] for p in json.loads(shown)["placements"]}


@dataclass
class Measured:
    """One step timed while every model was asked throughout."""

    what: str
    wall_s: float
    counts: dict[str, Counts]
    since: float
    result: Any

    def failed(self) -> dict[str, int]:
        return {m: len(c.failed) for m, c in self.counts.items()}

    def answered(self) -> dict[str, int]:
        return {m: len(c.answered) for m, c in self.counts.items()}

    def describe(self) -> str:
        found = {
            m: (len(c.answered), c.failures_by_reason(since=self.since))
            for m, c in self.counts.items()
        }
        return (
            f"{self.what}: {self.wall_s:.1f} s; per model, requests answered and failures "
            f"(count, first, last s): {found}"
        )


def measured(
    rack: Rack,
    what: str,
    step: Callable[[], Any],
    models: Sequence[str] = MODELS,
    settle_s: float = 3.0,
) -> Measured:
    """Run `step` while a client loop asks every model through the head's endpoint; ask on
    for `settle_s` after it (a request sent as the step ends is counted too)."""
    loop = ClientLoop(SERVE_PORT, list(models), pause_s=0.2, host=rack.hosts[0].ip, timeout_s=30)
    with loop:
        since = time.monotonic()
        result = step()
        wall = time.monotonic() - since
        time.sleep(settle_s)
    done = Measured(what, wall, loop.counts, since, result)
    print(f"\n{done.describe()}", flush=True)
    return done
