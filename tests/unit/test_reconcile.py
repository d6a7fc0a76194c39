"""What a reconcile pass decides, and re-planning without a lost node: pure, no Ray."""

from __future__ import annotations

import pytest

from deployer.planning.reconcile import Decision, Observed, decide
from deployer.planning.redeploy import Deployed, replan
from deployer.serving.reconcile import Tracker
from deployer.sources.estimates import estimate_models
from tests.unit.test_redeploy import CLUSTER, deploy, gpus, models, record

pytestmark = pytest.mark.unit

WANTED = models(
    "{model_id: x, gpu_memory_gib: 60}",
    "{model_id: y, gpu_memory_gib: 60}",
    "{model_id: z, gpu_memory_gib: 60, node: b}",
)


def deployed() -> Deployed:
    return record(WANTED, deploy(WANTED, None))


def nodes_of(desired: Deployed) -> dict[str, str]:
    return {p["model_id"]: p["node"] for p in desired.placements}


def seen(alive: set[str], ingress: bool = True, engines: set[str] | None = None) -> Observed:
    return Observed(
        alive=frozenset(alive),
        ingress=ingress,
        engines=frozenset({"x", "y", "z"} if engines is None else engines),
    )


def test_nothing_deployed_or_everything_running_means_nothing_to_do() -> None:
    assert decide(None, seen(set()), {}).action == "none"
    assert decide(deployed(), seen({"a", "b"}), {}).action == "none"


def test_a_cold_start_waits_for_the_nodes_then_deploys_without_the_missing() -> None:
    cold = seen({"a"}, ingress=False, engines=set())
    waiting = decide(deployed(), cold, {"b": 10.0}, join_timeout_s=300)
    assert waiting.action == "wait"
    assert "b" in waiting.reason
    late = decide(deployed(), cold, {"b": 400.0}, join_timeout_s=300)
    assert (late.action, late.lost) == ("deploy", ("b",))
    everyone = decide(deployed(), seen({"a", "b"}, ingress=False, engines=set()), {})
    assert (everyone.action, everyone.lost) == ("deploy", ())


def test_a_node_gone_past_the_grace_period_is_planned_without() -> None:
    desired = deployed()
    assert nodes_of(desired)["z"] == "b"
    within = decide(desired, seen({"a"}), {"b": 30.0}, grace_s=60)
    assert within.action == "wait"
    past = decide(desired, seen({"a"}), {"b": 61.0}, grace_s=60)
    assert (past.action, past.lost) == ("deploy", ("b",))
    assert "z" in past.reason


def test_an_engine_removed_by_hand_is_deployed_again() -> None:
    decision = decide(deployed(), seen({"a", "b"}, engines={"x", "z"}), {})
    assert decision.action == "deploy"
    assert "y" in decision.reason
    assert decision.lost == ()


def test_nodes_not_seen_since_the_controller_started_get_the_join_timeout() -> None:
    """After a head reboot the workers may boot later than the head: not lost at grace_s."""
    desired = deployed()
    booting = decide(desired, seen({"a"}), {"b": 90.0}, grace_s=60, never_seen=frozenset("b"))
    assert booting.action == "wait"
    late = decide(desired, seen({"a"}), {"b": 301.0}, join_timeout_s=300, never_seen=frozenset("b"))
    assert (late.action, late.lost) == ("deploy", ("b",))


def test_a_model_left_unplaced_is_placed_again_when_a_node_joins() -> None:
    full = deployed()
    without_z = Deployed(
        models=full.models,
        placements=[p for p in full.placements if p["model_id"] != "z"],
        engines={m: e for m, e in full.engines.items() if m != "z"},
    )
    assert without_z.unplaced() == ["z"]
    running = seen({"a", "b"}, engines={"x", "y"})
    assert decide(without_z, running, {}).action == "none"  # nobody joined: no new room
    back = decide(without_z, running, {}, joined=frozenset("b"))
    assert (back.action, back.lost) == ("deploy", ())
    assert "z" in back.reason
    nothing_placed = Deployed(models=full.models, placements=[], engines={})
    assert decide(nothing_placed, seen({"a"}, False, set()), {}).action == "none"
    assert decide(nothing_placed, seen({"a"}, False, set()), {}, joined=frozenset("a")).action == (
        "deploy"
    )


def test_a_join_stays_pending_until_a_pass_that_could_place_on_it_completes() -> None:
    """The controller's bookkeeping: worker c boots while a pass fails (its probe not answering
    yet). The unplaced model is placed by the next pass, not forgotten (a CI run waited 300 s)."""
    full = deployed()
    without_z = Deployed(
        models=full.models,
        placements=[p for p in full.placements if p["model_id"] != "z"],
        engines={m: e for m, e in full.engines.items() if m != "z"},
    )
    tracker = Tracker(started=0.0)

    def next_pass(alive: str, now: float) -> Decision:
        memory = tracker.memory(without_z, frozenset(alive), now)
        observed = seen(set(alive), engines={"x", "y"})
        return decide(without_z, observed, memory.gone_for_s, joined=memory.joined)

    first = next_pass("ab", 1.0)
    tracker.completed(first)  # placed what it could
    assert next_pass("ab", 2.0).action == "none"
    booted = next_pass("abc", 3.0)
    assert (booted.action, "z" in booted.reason) == ("deploy", True)
    # that pass raised (no tracker.completed): the next one tries again
    again = next_pass("abc", 4.0)
    assert again.action == "deploy"
    tracker.completed(again)
    assert next_pass("abc", 5.0).action == "none"  # tried with c: no retry loop
    assert next_pass("ab", 6.0).action == "none"  # c away ...
    assert next_pass("abc", 7.0).action == "deploy"  # ... and back: it joins again
    assert tracker.memory(full, frozenset("a"), 20.0).gone_for_s == {"b": 13.0}  # seen at 7.0


def test_a_node_joins_once_it_has_been_up_for_the_settle_time() -> None:
    """A worker that has just booted gets no engine in its first seconds; one that flaps starts
    its settle time again."""
    tracker = Tracker(started=0.0, settle_s=10.0)
    assert tracker.memory(None, frozenset("a"), 0.0).joined == frozenset()
    assert tracker.memory(None, frozenset("a"), 10.0).joined == frozenset("a")
    tracker.completed(Decision("none", "placed what it could"))
    assert tracker.memory(None, frozenset("ab"), 12.0).joined == frozenset()  # b just booted
    tracker.completed(Decision("none", "nothing to place on b yet"))  # b not used up yet
    assert tracker.memory(None, frozenset("a"), 15.0).joined == frozenset()  # b flaps
    assert tracker.memory(None, frozenset("ab"), 16.0).joined == frozenset()
    assert tracker.memory(None, frozenset("ab"), 26.0).joined == frozenset("b")


def test_re_planning_without_a_lost_node_moves_only_its_models() -> None:
    desired = deployed()
    where = nodes_of(desired)
    on_b = sorted(m for m, n in where.items() if n == "b")
    alive = CLUSTER.model_copy(update={"nodes": [n for n in CLUSTER.nodes if n.name != "b"]})
    change = replan(
        alive, WANTED, estimate_models(WANTED), desired, ["x", "y", "z"], 0.0, lost=["b"]
    )
    assert sorted(change.stop) == on_b
    placed = gpus(change)
    for model_id, node in where.items():
        if node == "a":
            assert model_id in change.keep
            assert placed[model_id] == gpus(deploy(WANTED, None))[model_id]
    # z is pinned to b by its config: unplaced, not moved; unpinned models of b moved to a.
    assert [u.model_id for u in change.plan.unplaced] == ["z"]
    assert all(placed[m][0] == "a" for m in on_b if m != "z")


def test_a_node_loss_never_stops_an_engine_on_a_node_still_up_to_make_room() -> None:
    """Three 50 GiB models on 2 + 1 GPUs of two nodes; the node with two is lost, and only one
    GPU is left: one of its models moves there and the other is unplaced, while the engine
    already on the surviving node keeps running where it is."""
    two_nodes = CLUSTER.model_copy(
        update={"nodes": [n.model_copy(update={"gpus": n.gpus[:2]}) for n in CLUSTER.nodes]}
    )
    wanted = models(*(f"{{model_id: m{i}, gpu_memory_gib: 50}}" for i in range(3)))
    first = deploy(wanted, None, two_nodes)
    where = nodes_of(record(wanted, first))
    lost = max(("a", "b"), key=list(where.values()).count)
    survivor = two_nodes.model_copy(
        update={"nodes": [n for n in two_nodes.nodes if n.name != lost]}
    )
    (staying,) = (m for m, n in where.items() if n != lost)
    change = replan(
        survivor,
        wanted,
        estimate_models(wanted),
        record(wanted, first),
        ["m0", "m1", "m2"],
        0.0,
        lost=[lost],
    )
    assert staying in change.keep
    assert gpus(change)[staying] == gpus(first)[staying]
    assert staying not in change.stop
    assert len(change.plan.placements) == 2
    (unplaced,) = change.plan.unplaced
    assert "stopping an engine" in unplaced.reason
