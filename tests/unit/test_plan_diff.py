"""The plan diff: per model keep, start, stop, restart or move, and why, from real re-plans."""

from __future__ import annotations

import pytest

from deployer.config.cluster import Cluster
from deployer.config.models_config import ModelManager
from deployer.planning.plan_diff import ModelChange, changed_fields, disruptive, plan_diff
from deployer.planning.redeploy import Deployed, models_document, replan
from deployer.sources.estimates import estimate_models
from tests.unit.test_redeploy import CLUSTER, deploy, models, node, record

pytestmark = pytest.mark.unit

X = "{model_id: x, gpu_memory_gib: 30}"
Y = "{model_id: y, gpu_memory_gib: 30}"
FIRST = "; the new engine starts first, the old stops once it serves"


def diff(
    wanted: ModelManager,
    before: Deployed | None,
    cluster: Cluster = CLUSTER,
    lost: tuple[str, ...] = (),
) -> dict[str, ModelChange]:
    running = list(before.engines) if before else []
    change = replan(cluster, wanted, estimate_models(wanted), before, running, 0.0, lost=lost)
    found = plan_diff(before, running, change, models_document(wanted), lost)
    return {c.model_id: c for c in found}


def deployed(*lines: str) -> Deployed:
    wanted = models(*lines)
    return record(wanted, deploy(wanted, None))


def test_nothing_changed_keeps_every_model_in_place() -> None:
    before = deployed(X, Y)
    changes = diff(models(X, Y), before)
    assert {m: c.action for m, c in changes.items()} == {"x": "keep", "y": "keep"}
    assert changes["x"].before == changes["x"].after != ""
    assert disruptive(list(changes.values())) == []


def test_a_new_model_starts_and_a_removed_one_stops() -> None:
    changes = diff(models(X, "{model_id: z, gpu_memory_gib: 10}"), deployed(X, Y))
    assert (changes["z"].action, changes["z"].why, changes["z"].before) == ("start", "new", "")
    assert changes["z"].after.startswith(("a GPUs ", "b GPUs "))
    assert (changes["y"].action, changes["y"].why, changes["y"].after) == (
        "stop",
        "removed from the models",
        "",
    )
    # x shared y's GPU: with y gone the plan gives x more KV cache, which restarts it, said so;
    # its new engine fits beside the old one on that GPU, so it starts first
    assert (changes["x"].action, changes["x"].why) == (
        "restart",
        "launch description changed: engine_kwargs.gpu_memory_utilization" + FIRST,
    )
    assert [c.model_id for c in disruptive(list(changes.values()))] == ["x", "y"]


def test_a_changed_setting_starts_beside_the_old_engine_and_names_the_field() -> None:
    before = deployed(X, Y)
    changes = diff(models(X, "{model_id: y, gpu_memory_gib: 30, max_model_len: 4096}"), before)
    assert changes["x"].action == "keep"
    # y runs alone on a GPU of b: its new engine takes b's other GPU while the old one serves
    assert changes["y"].action == "move", changes["y"]
    assert changes["y"].before.split()[0] == changes["y"].after.split()[0] == "b"
    assert changes["y"].why == "changed: max_model_len" + FIRST


def test_without_room_for_both_a_changed_model_stops_first_and_says_so() -> None:
    one_gpu = Cluster(nodes=[node("a", 1)])
    wanted = models("{model_id: y, gpu_memory_gib: 50}")
    before = record(wanted, deploy(wanted, None, one_gpu))
    changes = diff(models("{model_id: y, gpu_memory_gib: 50, max_num_seqs: 8}"), before, one_gpu)
    assert changes["y"].action == "restart"
    assert changes["y"].why == "changed: max_num_seqs; no room for both: stops first"


def test_a_drained_nodes_models_move_beside_their_running_engines() -> None:
    wanted = models(X, Y)
    before = record(wanted, deploy(wanted, None))
    on_b = [p["model_id"] for p in before.placements if p["node"] == "b"]
    on_a = [p["model_id"] for p in before.placements if p["node"] == "a"]
    running = list(before.engines)
    for drained in ("a", "b"):
        here = on_a if drained == "a" else on_b
        change = replan(
            CLUSTER, wanted, estimate_models(wanted), before, running, 0.0, drained=[drained]
        )
        assert all(p.node != drained for p in change.plan.placements)
        assert sorted(change.make_before_break) == sorted(here)
        assert change.downtime == []
        assert not set(here) & set(change.stop)  # their old engines stop after, not before
        assert sorted(change.keep) == sorted(set(running) - set(here))
        found = {c.model_id: c for c in plan_diff(before, running, change, models_document(wanted),
                                                   drained=[drained])}  # fmt: skip
        for model_id in here:
            assert found[model_id].action == "move"
            assert found[model_id].why == f"node {drained} is drained" + FIRST


def test_a_model_pinned_to_a_drained_node_is_unplaced_with_what_to_do() -> None:
    wanted = models(X, "{model_id: y, gpu_memory_gib: 30, node: b}")
    before = record(wanted, deploy(wanted, None))
    change = replan(
        CLUSTER, wanted, estimate_models(wanted), before, list(before.engines), 0.0, drained=["b"]
    )
    (unplaced,) = change.plan.unplaced
    assert unplaced.model_id == "y"
    assert "drained; undrain it or change the model's node" in unplaced.reason
    assert "y" in change.stop


def test_a_model_that_grows_past_its_gpu_moves_and_says_from_where_to_where() -> None:
    before = deployed(X, Y)
    changes = diff(models(X, "{model_id: y, gpu_memory_gib: 30, tensor_parallel_size: 2}"), before)
    moved = changes["y"]
    assert moved.action == "move", moved
    assert moved.before != moved.after
    assert moved.after.count(",") == 1  # two GPUs now
    assert "tensor_parallel_size" in moved.why


def test_a_lost_nodes_models_move_and_say_the_node_is_lost() -> None:
    only_b = Cluster(nodes=[node("b", 2)])
    wanted = models(X, Y)
    before = record(wanted, deploy(wanted, None, only_b))
    changes = diff(wanted, before, Cluster(nodes=[node("a", 4)]), lost=("b",))
    for model_id in ("x", "y"):
        moved = changes[model_id]
        assert (moved.action, moved.why) == ("move", "node b is lost"), moved
        assert moved.before.startswith("b GPUs ")
        assert moved.after.startswith("a GPUs ")


def test_a_model_pinned_to_a_lost_node_stops_with_the_reason() -> None:
    wanted = models(
        "{model_id: x, gpu_memory_gib: 30, node: a}", "{model_id: y, gpu_memory_gib: 30, node: b}"
    )
    before = record(wanted, deploy(wanted, None))
    changes = diff(wanted, before, Cluster(nodes=[node("a", 4)]), lost=("b",))
    assert changes["y"].action == "stop"
    assert "lost" in changes["y"].why
    assert changes["x"].action == "keep"


def test_a_model_that_does_not_fit_and_does_not_run_is_unplaced_not_stopped() -> None:
    changes = diff(models(X, "{model_id: huge, gpu_memory_gib: 4096}"), None)
    assert changes["x"].action == "start"
    assert changes["huge"].action == "unplaced"
    assert changes["huge"].why


def test_changed_fields_gives_dotted_paths() -> None:
    before = {"a": 1, "engine_kwargs": {"max_model_len": 1, "dtype": "auto"}}
    after = {"a": 1, "engine_kwargs": {"max_model_len": 2, "dtype": "auto", "seed": 0}}
    assert changed_fields(before, after) == ["engine_kwargs.max_model_len", "engine_kwargs.seed"]
    assert changed_fields(None, {"a": 1}) == [""]


def test_a_rebalance_plans_as_on_an_empty_cluster_and_moves_only_what_lands_elsewhere() -> None:
    wanted = models(
        "{model_id: x, gpu_memory_gib: 50}",
        "{model_id: y, gpu_memory_gib: 20}",
        "{model_id: z, gpu_memory_gib: 20}",
    )
    # deployed while b was drained: everything on a, where an empty cluster's plan puts nothing
    first = replan(CLUSTER, wanted, estimate_models(wanted), None, [], 0.0, drained=["b"])
    before = record(wanted, first)
    assert {p["node"] for p in before.placements} == {"a"}
    running = list(before.engines)
    fresh = replan(CLUSTER, wanted, estimate_models(wanted), None, [], 0.0)
    change = replan(CLUSTER, wanted, estimate_models(wanted), before, running, 0.0, rebalance=True)
    where = {p.model_id: (p.node, p.gpus) for p in change.plan.placements}
    assert where == {p.model_id: (p.node, p.gpus) for p in fresh.plan.placements}
    was = {p["model_id"]: (p["node"], tuple(p["gpus"])) for p in before.placements}
    assert sorted(change.keep) == sorted(m for m in was if was[m] == where[m])
    assert sorted(change.make_before_break) == sorted(m for m in was if was[m] != where[m])
    assert change.make_before_break
    assert change.stop == []
    assert change.downtime == []
    kept = replan(CLUSTER, wanted, estimate_models(wanted), before, running, 0.0)
    assert sorted(kept.keep) == ["x", "y", "z"]  # without it, nothing moves
