"""The cluster description: nodes, their GPUs and memory.

`rackserve probe` writes this schema and `rackserve plan --cluster` reads it, so a cluster can be
probed once on the rack and planned against anywhere. Numbers are strict (81559, not "81559")
and bounded (`MAX_NODES`, `MAX_GPUS_PER_NODE`, `MAX_MEMORY_MIB`), as in the models file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployer.config.documents import decode_document, duplicates, read_input_file
from deployer.config.models_config import Name
from deployer.errors import ConfigError, printable, shown

NODE_LABEL = "rackserve/node"
"""Ray node label naming a node (`ray start --labels rackserve/node=NAME`); models pin to it."""

MAX_NODES = 4096
MAX_GPUS_PER_NODE = 64
MAX_MEMORY_MIB = 2**26
"""64 TiB: more than any GPU or node has."""

_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)


class Gpu(BaseModel):
    """One GPU of a node, as NVML reports it."""

    model_config = _STRICT

    index: int = Field(ge=0, lt=MAX_GPUS_PER_NODE, description="NVML device index on the node.")
    name: str = Field(
        default="", max_length=256, description="Product name, e.g. 'NVIDIA H100 80GB HBM3'."
    )
    memory_total_mib: int = Field(gt=0, le=MAX_MEMORY_MIB, description="Total memory in MiB.")
    memory_free_mib: int = Field(
        ge=0, le=MAX_MEMORY_MIB, description="Free device memory in MiB when probed."
    )
    memory_used_mib: int | None = Field(
        default=None, ge=0, le=MAX_MEMORY_MIB, description="Used memory in MiB."
    )
    uuid: str | None = Field(default=None, max_length=256, description="NVML uuid, e.g. 'GPU-…'.")

    @model_validator(mode="after")
    def _free_within_total(self) -> Gpu:
        if self.memory_free_mib > self.memory_total_mib:
            raise ValueError(
                f"memory_free_mib ({self.memory_free_mib}) exceeds memory_total_mib "
                f"({self.memory_total_mib})"
            )
        return self


class Node(BaseModel):
    """One node: its GPUs, or, for a node without GPUs, the memory a CPU engine may use."""

    model_config = _STRICT

    name: Name = Field(description="Node name; models pin to it with `node:`.")
    gpus: list[Gpu] = Field(
        default_factory=list, max_length=MAX_GPUS_PER_NODE, description="The node's NVIDIA GPUs."
    )
    cpu_memory_mib: int | None = Field(
        default=None,
        ge=0,
        le=MAX_MEMORY_MIB,
        description="Memory available to CPU engines, in MiB.",
    )
    driver_version: str | None = Field(
        default=None, max_length=256, description="NVIDIA driver version."
    )
    ray_node_id: str | None = Field(default=None, max_length=256, description="Ray node id (hex).")
    ip: str | None = Field(
        default=None, max_length=256, description="The node's address in the Ray cluster."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, max_length=256, description="Ray node labels."
    )

    @model_validator(mode="after")
    def _distinct_gpu_indices(self) -> Node:
        repeated = duplicates([gpu.index for gpu in self.gpus])
        if repeated:
            raise ValueError(f"GPU indices {repeated} appear more than once")
        return self

    @property
    def is_cpu_node(self) -> bool:
        """A node with no GPUs."""
        return not self.gpus


class Cluster(BaseModel):
    """All nodes of a cluster."""

    model_config = _STRICT

    nodes: list[Node] = Field(
        min_length=1, max_length=MAX_NODES, description="The nodes, in a stable order."
    )

    @model_validator(mode="after")
    def _distinct_node_names(self) -> Cluster:
        repeated = duplicates([node.name for node in self.nodes])
        if repeated:
            raise ValueError(f"node names {repeated} appear more than once")
        return self

    @property
    def has_gpus(self) -> bool:
        """Whether any node has a GPU."""
        return any(node.gpus for node in self.nodes)

    def node(self, name: str) -> Node | None:
        """The node with this name, if any."""
        return next((node for node in self.nodes if node.name == name), None)


def _where(loc: tuple[int | str, ...], document: Any) -> str:
    """'nodes[1] (name 'gpu-2').gpus[0].memory_free_mib' for an error location."""
    parts: list[str] = []
    current = document
    for part in loc:
        if isinstance(part, int):
            label = f"[{part}]"
            if isinstance(current, list) and part < len(current):
                current = current[part]
                if isinstance(current, dict) and isinstance(current.get("name"), str):
                    label += f" (name {shown(current['name'])})"
            parts.append(label)
        else:
            parts.append(("." if parts else "") + printable(str(part))[:80])
            current = current.get(part) if isinstance(current, dict) else None
    return "".join(parts) or "(cluster)"


def parse_cluster(text: str, source: str = "cluster") -> Cluster:
    """Parse a cluster description (YAML or JSON) with one message per problem."""
    document = decode_document(text, source)
    if not isinstance(document, dict):
        raise ConfigError(
            "expected a mapping with a top-level key 'nodes' holding a list", source=source
        )
    try:
        return Cluster.model_validate(document)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = str(err["msg"]).removeprefix("Value error, ")
            where = _where(tuple(err["loc"]), document)
            if err["type"] == "extra_forbidden":
                problems.append(f"{where}: unknown field")
            elif err["type"] == "missing":
                problems.append(f"{where}: is required")
            else:
                got = err["input"]
                value = "" if isinstance(got, dict | list) else f" (got {shown(got)})"
                problems.append(f"{where}: {message}{value}")
        raise ConfigError(problems, source=source) from None


def load_cluster(path: Path) -> Cluster:
    """Read and parse a cluster file."""
    return parse_cluster(read_input_file(path, "--cluster"), source=f"--cluster {path}")


def dump_cluster(cluster: Cluster) -> str:
    """The cluster as JSON, in the schema `parse_cluster` reads."""
    return json.dumps(cluster.model_dump(mode="json", exclude_none=True), indent=2) + "\n"
