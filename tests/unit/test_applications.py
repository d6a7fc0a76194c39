"""Engine applications' names and slots, and which one the ingress routes a model to.

Read from Ray Serve's own status classes (`ray.serve.schema`), as `serve.status()` returns them.
"""

from __future__ import annotations

from typing import Any

import pytest

from deployer.serving.applications import (
    ENGINE_DEPLOYMENT,
    app_model,
    current_app,
    engine_apps,
    free_slot,
    is_ours,
    model_app_name,
    serving_routes,
)

pytestmark = pytest.mark.unit


def app(at: float, running: int = 1, status: str = "RUNNING") -> Any:
    """An application as `serve.status()` gives it, with one engine deployment."""
    from ray.serve._private.common import (
        DeploymentStatus,
        DeploymentStatusTrigger,
        ReplicaState,
    )
    from ray.serve.schema import (
        ApplicationStatus,
        ApplicationStatusOverview,
        DeploymentStatusOverview,
    )

    engine = DeploymentStatusOverview(
        status=DeploymentStatus.HEALTHY,
        status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED,
        replica_states={ReplicaState.RUNNING: running} if running else {},
        message="",
    )
    return ApplicationStatusOverview(
        status=ApplicationStatus(status),
        message="",
        last_deployed_time_s=at,
        deployments={ENGINE_DEPLOYMENT: engine},
    )


@pytest.mark.parametrize("model_id", ["m", "org/m-7B", "a~slot", "x~slotz", "has#hash", ""])
@pytest.mark.parametrize("slot", [0, 1])
def test_an_engine_application_name_gives_back_its_model_and_slot(model_id: str, slot: int) -> None:
    name = model_app_name(model_id, slot)
    assert app_model(name) == (model_id, slot)
    assert is_ours(name)


def test_other_applications_are_not_engines() -> None:
    assert app_model("rackserve") is None
    assert app_model("someone-else") is None
    assert is_ours("rackserve")
    assert not is_ours("someone-else")


def test_the_newest_application_of_a_model_is_current_and_the_other_slot_is_free() -> None:
    apps = {
        model_app_name("a"): app(100.0),
        model_app_name("a", 1): app(200.0),
        model_app_name("b"): app(150.0),
        "rackserve": app(50.0),
    }
    assert engine_apps(apps) == {
        "a": [model_app_name("a", 1), model_app_name("a")],
        "b": [model_app_name("b")],
    }
    assert current_app(apps, "a") == model_app_name("a", 1)
    assert free_slot(apps, "a") == 0
    assert free_slot(apps, "b") == 1
    assert current_app(apps, "new") == model_app_name("new")
    assert free_slot(apps, "new") == 1


def test_routes_follow_the_newest_running_engine_and_never_one_being_deleted() -> None:
    old, new = model_app_name("a"), model_app_name("a", 1)
    starting = {old: app(100.0), new: app(200.0, running=0, status="DEPLOYING")}
    assert serving_routes(starting, ["a"]) == {"a": old}  # the new one does not serve yet
    both = {old: app(100.0), new: app(200.0)}
    assert serving_routes(both, ["a"]) == {"a": new}
    deleting = {old: app(300.0, status="DELETING"), new: app(200.0)}
    assert serving_routes(deleting, ["a"]) == {"a": new}
    down = {old: app(100.0, running=0, status="DEPLOYING")}
    assert serving_routes(down, ["a", "gone"]) == {"a": None, "gone": None}
