"""Reading an engine's history from GCS actor records (the record shape of `ray._private.state`)."""

from __future__ import annotations

from typing import Any

from deployer.serving.replicas import ReplicaHistory, history_of


def actor(name: str, state: str, start_ms: int = 0) -> dict[str, Any]:
    return {"Name": name, "State": state, "StartTime": start_ms, "ActorClassName": "x"}


def test_the_live_replica_gives_since_and_each_dead_one_since_the_deploy_a_restart() -> None:
    found = history_of(
        [
            actor("SERVE_REPLICA::rackserve-model:a#engine#x0", "DEAD", 500),  # before the deploy
            actor("SERVE_REPLICA::rackserve-model:a#engine#x1", "DEAD", 1_000),
            actor("SERVE_REPLICA::rackserve-model:a#engine#x2", "DEAD", 2_000),
            actor("SERVE_REPLICA::rackserve-model:a#engine#x3", "ALIVE", 3_500),
            actor("SERVE_REPLICA::rackserve-model:b#engine#y1", "ALIVE", 4_000),
        ],
        {"rackserve-model:a": 0.9},
    )
    assert found == {
        "rackserve-model:a": ReplicaHistory(since=3.5, restarts=2),
        "rackserve-model:b": ReplicaHistory(since=4.0, restarts=0),
    }


def test_a_model_id_with_hashes_and_other_actors_are_read_right() -> None:
    found = history_of(
        [
            actor("SERVE_REPLICA::rackserve-model:org/m#v2#engine#z9", "DEAD", 1_000),
            actor("SERVE_REPLICA::rackserve-model:org/m#v2#engine#z10", "PENDING_CREATION"),
            actor("SERVE_REPLICA::rackserve#RackserveIngress#i1", "ALIVE", 1_000),
            actor("SERVE_CONTROLLER_ACTOR", "ALIVE", 1_000),
            {"Name": "", "State": "ALIVE"},
        ],
        {},
    )
    assert found == {"rackserve-model:org/m#v2": ReplicaHistory(since=None, restarts=1)}
