"""The plan as Prometheus samples: what rackserve booked per model, node and GPU, and what serves.

Pure: the last deployed record and what a controller pass saw in, samples out. The controller
serves them (`deployer.serving.exporter`); the alert rules and the dashboard read them beside
vLLM's and Ray Serve's own series, which carry the model id as `model_name` and
`application` (`rackserve-model:<model id>`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from deployer.config.units import GIB
from deployer.planning.redeploy import Deployed

FAMILIES: Mapping[str, str] = {
    "rackserve_model_desired": "1 for each model the desired state asks for.",
    "rackserve_model_serving": "1 when the model's engine has a running replica, else 0.",
    "rackserve_model_placed": "1 when the last plan placed the model (on `node`), 0 when it "
    "left it unplaced.",
    "rackserve_booked_bytes": "Memory the plan booked for the model on one device: a GPU "
    "(`gpu` its index) or a CPU node's RAM (`gpu` empty).",
    "rackserve_gpu_memory_utilization": "The model's vLLM gpu_memory_utilization, as planned.",
    "rackserve_ray_gpu_fraction": "The Ray GPU fraction each rank of the model asks for.",
    "rackserve_node_alive": "1 for each planned node Ray sees alive (by its rackserve/node "
    "label), 0 for one it does not.",
    "rackserve_node_address": "1 for each node Ray sees alive, with its IP (`ip`): joins the "
    "plan's nodes to Ray's and the exporters' series, which carry the IP.",
}
"""Every gauge rackserve exports, with its help text."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One gauge value with its labels."""

    name: str
    labels: Mapping[str, str]
    value: float


def plan_samples(
    deployed: Deployed | None,
    serving: frozenset[str],
    alive: frozenset[str],
    addresses: Mapping[str, str] | None = None,
) -> list[Sample]:
    """The gauges for `deployed` (nothing when nothing is deployed).

    `serving`: the model ids whose engine has a running replica; `alive`: the node names Ray
    sees alive; `addresses`: their IPs, by name.
    """
    if deployed is None:
        return []
    samples: list[Sample] = []
    placed = {p["model_id"]: p for p in deployed.placements}
    for model in deployed.models:
        model_id = model["model_id"]
        placement = placed.get(model_id)
        node = placement["node"] if placement else ""
        samples.append(Sample("rackserve_model_desired", {"model": model_id}, 1.0))
        serves = 1.0 if placement and model_id in serving else 0.0
        samples.append(Sample("rackserve_model_serving", {"model": model_id}, serves))
        at = {"model": model_id, "node": node}
        samples.append(Sample("rackserve_model_placed", at, 1.0 if placement else 0.0))
        if placement is None:
            continue
        booked = float(placement["gpu_memory_gib"]) * GIB
        for gpu in placement["gpus"] or [""]:
            labels = {**at, "gpu": str(gpu)}
            samples.append(Sample("rackserve_booked_bytes", labels, booked))
        for name, key in (
            ("rackserve_gpu_memory_utilization", "gpu_memory_utilization"),
            ("rackserve_ray_gpu_fraction", "gpu_fraction"),
        ):
            if placement.get(key) is not None:
                samples.append(Sample(name, at, float(placement[key])))
    for node in sorted({p["node"] for p in deployed.placements} | alive):
        samples.append(Sample("rackserve_node_alive", {"node": node}, float(node in alive)))
    for node, ip in sorted((addresses or {}).items()):
        if node in alive:
            samples.append(Sample("rackserve_node_address", {"node": node, "ip": ip}, 1.0))
    return samples
