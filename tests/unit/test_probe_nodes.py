"""Which Ray nodes the probe visits, what it names them, and in which order (no Ray needed)."""

from __future__ import annotations

from typing import Any

import pytest

from deployer.serving.probe import NODE_LABEL, ProbeError, RayNode, node_name, nodes_to_probe

pytestmark = pytest.mark.unit


def ray_node(node_id: str, ip: str, name: str | None = None, alive: bool = True) -> dict[str, Any]:
    """One entry of `ray.nodes()` as Ray 2.60 returns it (the fields the probe reads)."""
    return {
        "NodeID": node_id,
        "Alive": alive,
        "NodeManagerAddress": ip,
        "NodeManagerHostname": "same-host",
        "NodeName": ip,
        "Labels": {"ray.io/node-id": node_id} | ({NODE_LABEL: name} if name else {}),
    }


def test_the_label_names_a_node_else_its_ip() -> None:
    assert node_name({NODE_LABEL: "gpu-07"}, "10.0.0.7") == "gpu-07"
    assert node_name({}, "10.0.0.7") == "10.0.0.7"
    assert node_name({NODE_LABEL: ""}, "10.0.0.7") == "10.0.0.7"


def test_alive_nodes_only_sorted_by_name_with_numbers_compared_as_numbers() -> None:
    table = [
        ray_node("c" * 56, "10.0.0.10", "gpu-10"),
        ray_node("d" * 56, "10.0.0.9", "gpu-9", alive=False),
        ray_node("a" * 56, "10.0.0.2", "gpu-2"),
        ray_node("b" * 56, "10.0.0.3"),
    ]

    nodes = nodes_to_probe(table)

    assert [node.name for node in nodes] == ["10.0.0.3", "gpu-2", "gpu-10"]
    assert nodes[1] == RayNode(
        name="gpu-2",
        node_id="a" * 56,
        ip="10.0.0.2",
        labels={"ray.io/node-id": "a" * 56, NODE_LABEL: "gpu-2"},
    )


def test_a_dead_node_may_share_a_name_with_its_replacement() -> None:
    table = [
        ray_node("a" * 56, "10.0.0.2", "gpu-2", alive=False),
        ray_node("b" * 56, "10.0.0.2", "gpu-2"),
    ]
    assert [node.node_id for node in nodes_to_probe(table)] == ["b" * 56]


def test_two_alive_nodes_with_one_name_are_an_error_that_says_what_to_do() -> None:
    table = [
        ray_node("a" * 56, "10.0.0.2", "gpu"),
        ray_node("b" * 56, "10.0.0.3", "gpu"),
    ]
    with pytest.raises(ProbeError, match=r"named gpu: .*--labels rackserve/node=NAME"):
        nodes_to_probe(table)


def test_no_labels_field_is_no_labels() -> None:
    entry = ray_node("a" * 56, "10.0.0.2")
    del entry["Labels"]
    assert nodes_to_probe([entry])[0].labels == {}
