"""The demo's last step: rackserve's stand-in engine on logical GPUs of the rack-in-a-box.

The demo's workers start Ray with 4 logical GPUs each (`ray_worker_logical_gpus`), which NVML
cannot see: the tiny models run on CPU as before, then a second `rackserve bootstrap --tags
deploy_models` deploys a GPU model set with the stand-in engine (`deploy_models_engine:
standin`) against a cluster file declaring those GPUs as H100s (`deploy_models_cluster`). The
stand-ins serve nothing; each reports the node and GPU ids Ray gave its ranks, and the demo
shows them beside the plan (`rackserve status`).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

LOGICAL_GPUS = 4
# The boxed workers have the machine's 2 cores; each engine replica (vLLM's or the stand-in's)
# holds one Ray CPU, so the workers declare more.
INVENTORY_VARS: dict[str, Any] = {"ray_worker_logical_gpus": LOGICAL_GPUS, "ray_worker_num_cpus": 8}
H100 = {"name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559, "memory_free_mib": 81008}
MODELS: list[dict[str, Any]] = [
    {"model_id": "llama-70b", "tensor_parallel_size": 2, "gpu_memory_gib": 60},
    {"model_id": "mixtral-8x7b", "tensor_parallel_size": 2, "gpu_memory_gib": 46},
    {"model_id": "llama-8b", "gpu_memory_gib": 21},
    {"model_id": "qwen-7b", "gpu_memory_gib": 20},
    {"model_id": "embedder", "gpu_memory_gib": 4},
]
VENV_PYTHON = "/opt/rackserve/venv/bin/python"

# Run on the head with the venv's Python: the plan's node and GPUs per model (`rackserve
# status`'s), and what each stand-in's ranks got from Ray. Serve handles keep threads that would
# start a local Ray after a shutdown, so the script leaves without one.
REPORTS_SCRIPT = """
import dataclasses, json, os, sys
os.environ["RAY_ADDRESS"] = sys.argv[1]
from deployer.serving.ray_token import use_rack_token
use_rack_token()  # the rack's Ray token, as rackserve uses it
import ray
from ray import serve
from deployer.serving.applications import current_app
from deployer.serving.launch import model_statuses
statuses = model_statuses(sys.argv[1])
ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], logging_level="ERROR",
         log_to_driver=False)
apps = serve.status().applications
found = []
for status in statuses:
    report = serve.get_app_handle(current_app(apps, status.model_id)).report.remote().result()
    found.append({"status": dataclasses.asdict(status), "report": dataclasses.asdict(report)})
print("RACKSERVE-STANDIN " + json.dumps(found), flush=True)
os._exit(0)
"""


def standin_vars(workers: Sequence[str], port: int, environment: dict[str, str]) -> dict[str, Any]:
    """Extra vars of the stand-in pass: the GPU model set, the stand-in, the declared GPUs."""
    gpus = [{"index": index, **H100} for index in range(LOGICAL_GPUS)]
    return {
        "deploy_models_enabled": True,
        "deploy_models_file": "",
        "deploy_models_models": MODELS,
        "deploy_models_engine": "standin",
        "deploy_models_cluster": {"nodes": [{"name": name, "gpus": gpus} for name in workers]},
        "deploy_models_environment": environment,
        "deploy_models_extra_args": ["--http-port", str(port)],
    }


def reports_command(head_ip: str, ray_port: int) -> str:
    """The shell command that prints the stand-ins' reports on the head."""
    return shlex.join([VENV_PYTHON, "-c", REPORTS_SCRIPT, f"{head_ip}:{ray_port}", head_ip])


def parse_reports(stdout: str) -> list[dict[str, Any]]:
    """The reports the command printed; ValueError when it printed none."""
    for line in stdout.splitlines():
        if line.startswith("RACKSERVE-STANDIN "):
            found: list[dict[str, Any]] = json.loads(line.split(" ", 1)[1])
            return found
    raise ValueError("no stand-in reports in the output")


def disagreements(found: Sequence[dict[str, Any]]) -> list[str]:
    """Models whose ranks did not run on the plan's node and GPUs, each with what differs."""
    wrong = []
    for entry in found:
        status, report = entry["status"], entry["report"]
        ray_gpus = [gpu for rank in report["ranks"] for gpu in rank["gpu_ids"]]
        nodes = {rank["node"] for rank in report["ranks"]} | {report["node"]}
        if nodes != {status["node"]} or sorted(ray_gpus) != sorted(status["gpus"]):
            wrong.append(
                f"{status['model_id']}: planned {status['node']} GPUs {status['gpus']}, "
                f"Ray gave {sorted(nodes)} GPUs {ray_gpus}"
            )
    return wrong


def reports_table(found: Sequence[dict[str, Any]]) -> Table:
    """Per model: the plan's GPUs beside the GPU ids Ray gave each rank of the stand-in."""
    table = Table(title="Stand-in engines: planned GPUs and what Ray gave each rank",
                  title_justify="left")  # fmt: skip
    for column in ("model", "node", "planned GPUs", "Ray GPU ids by rank", "gpu_mem_util",
                   "VLLM_RAY_PER_WORKER_GPUS", "state"):  # fmt: skip
        table.add_column(column)
    for entry in found:
        status, report = entry["status"], entry["report"]
        ranks = " | ".join(
            f"{rank['rank']}: {','.join(map(str, rank['gpu_ids']))}" for rank in report["ranks"]
        )
        table.add_row(
            status["model_id"],
            report["node"] or "?",
            ",".join(map(str, status["gpus"])),
            ranks,
            f"{report['gpu_memory_utilization']:.4f}",
            report["vllm_ray_per_worker_gpus"] or "-",
            status["state"],
        )
    return table


def show_reports(found: Sequence[dict[str, Any]]) -> bool:
    """Print the table and whether Ray's assignments agree with the plan; True when they do."""
    console = Console(width=140)
    console.print(reports_table(found))
    wrong = disagreements(found)
    if wrong:
        console.print("Ray's GPUs differ from the plan:\n  " + "\n  ".join(wrong))
    else:
        console.print(f"Ray gave every rank of the {len(found)} stand-in engines the planned "
                      "node and GPUs.")  # fmt: skip
    return not wrong
