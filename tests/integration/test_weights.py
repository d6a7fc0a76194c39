"""`rackserve stage` puts `weights: staged` models on their planned nodes, through a real local
Ray cluster (a head and a worker on loopback, both on this machine's disk). `deploy` staging
before its engines start is tested on the rack-in-a-box (tests/rack/test_site.py).

Each model's store directory is its own, so the files of each show which node's task wrote
them; the command's own lines say where each copy ran, and the staging code checks that the
task ran on the planned Ray node. The stores are tmpfs mounts, so a full disk is real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployer.errors import ExitCode
from deployer.staging import read_manifest, verify_model
from tests.checkpoints import flip_last_byte, write_checkpoint, write_sums
from tests.conftest import Mount
from tools.local_ray import RayCluster

pytestmark = pytest.mark.integration

RACKSERVE = [sys.executable, "-m", "deployer"]


def rackserve(
    *args: str, address: str, check_code: int | None = 0
) -> subprocess.CompletedProcess[str]:
    """`rackserve ARGS` against the cluster, as an operator runs it on the head."""
    env = {**os.environ, "RAY_ADDRESS": address, "COLUMNS": "200", "NO_COLOR": "1"}
    done = subprocess.run(
        [*RACKSERVE, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    if check_code is not None:
        assert done.returncode == check_code, done.stdout + done.stderr
    return done


def models_file(path: Path, models: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"models": models}))
    return path


def staged(model_id: str, source: Path, store: Path, node: str) -> dict[str, Any]:
    return {"model_id": model_id, "model_source": str(source), "weights": "staged",
            "store_dir": str(store), "node": node, "gpu_memory_gib": 0.5}  # fmt: skip


@pytest.fixture
def two_models(tmp_path: Path, tmpfs: Mount) -> dict[str, Any]:
    """Two checkpoints (one with SHA256SUMS) pinned one per node, each with an 80 MiB store."""
    sources = {
        "tiny-a": write_checkpoint(tmp_path / "src-a", sums=True),
        "org/tiny-b": write_checkpoint(tmp_path / "src-b"),
    }
    stores = {"tiny-a": tmpfs("size=80m"), "org/tiny-b": tmpfs("size=80m")}
    nodes = {"tiny-a": "head", "org/tiny-b": "worker"}
    path = models_file(
        tmp_path / "models.yaml",
        [staged(m, sources[m], stores[m], nodes[m]) for m in sources],
    )
    return {"file": path, "sources": sources, "stores": stores, "nodes": nodes,
            "state": tmp_path / "state"}  # fmt: skip


def stage(setup: dict[str, Any], cluster: RayCluster, code: int = 0) -> str:
    done = rackserve("stage", "--models", str(setup["file"]), "--state-dir", str(setup["state"]),
                     address=cluster.address, check_code=code)  # fmt: skip
    return done.stdout + done.stderr


def test_stage_copies_each_model_to_its_node_once_and_repairs_damage(
    ray_cluster: RayCluster, two_models: dict[str, Any]
) -> None:
    out = stage(two_models, ray_cluster)
    for model, node in two_models["nodes"].items():
        directory = two_models["stores"][model] / model.replace("/", "--")
        manifest = read_manifest(two_models["sources"][model], model)
        assert verify_model(directory, manifest) == []
        assert f"{model}@{node}: copied {len(manifest.entries)} files" in out, out
        assert sorted(os.listdir(two_models["stores"][model])) == [directory.name]
    assert "weights ready on every node" in out

    again = stage(two_models, ray_cluster)
    for model, node in two_models["nodes"].items():
        assert f"{model}@{node}: already staged" in again, again

    # A flipped byte with SHA256SUMS is found and that one file copied again.
    shard = two_models["stores"]["tiny-a"] / "tiny-a" / "model-00001-of-00002.safetensors"
    flip_last_byte(shard)
    repaired = stage(two_models, ray_cluster)
    assert "tiny-a@head: copied 1 files" in repaired, repaired
    assert "org/tiny-b@worker: already staged" in repaired, repaired
    assert (
        verify_model(shard.parent, read_manifest(two_models["sources"]["tiny-a"], "tiny-a")) == []
    )


def test_a_full_store_fails_the_stage_naming_node_model_and_bytes_and_leaves_nothing(
    ray_cluster: RayCluster, tmp_path: Path, tmpfs: Mount
) -> None:
    source = write_checkpoint(tmp_path / "src")
    store = tmpfs("size=1m")  # below the 64 MiB staging keeps free
    path = models_file(tmp_path / "models.yaml", [staged("tiny-c", source, store, "worker")])
    done = rackserve("stage", "--models", str(path), "--state-dir", str(tmp_path / "state"),
                     address=ray_cluster.address, check_code=ExitCode.FAILURE)  # fmt: skip
    message = done.stderr
    assert "node worker: model 'tiny-c': not enough space in" in message, message
    assert "bytes) short" in message, message
    assert "Nothing was written" in message, message
    assert "nothing was started or stopped" in message, message
    assert os.listdir(store) == []


def test_a_broken_checkpoint_is_bad_input_before_any_copy(
    ray_cluster: RayCluster, tmp_path: Path, tmpfs: Mount
) -> None:
    source = write_checkpoint(tmp_path / "src")
    write_sums(source)
    sums = source / "SHA256SUMS"
    sums.write_text(sums.read_text() + "not a digest line\n")
    store = tmpfs("size=80m")
    path = models_file(tmp_path / "models.yaml", [staged("tiny-d", source, store, "head")])
    done = rackserve("stage", "--models", str(path), "--state-dir", str(tmp_path / "state"),
                     address=ray_cluster.address, check_code=ExitCode.BAD_INPUT)  # fmt: skip
    assert "cannot read the checkpoints to stage" in done.stderr, done.stderr
    assert "tiny-d" in done.stderr, done.stderr
    assert "SHA256SUMS" in done.stderr, done.stderr
    assert os.listdir(store) == []


def test_a_shared_copy_is_verified_on_each_node_and_a_damaged_one_refused(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    shared = write_checkpoint(tmp_path / "nfs" / "tiny-e", sums=True)
    entry = {"model_id": "tiny-e", "model_source": str(shared), "weights": "shared",
             "gpu_memory_gib": 0.5, "node": "worker"}  # fmt: skip
    path = models_file(tmp_path / "models.yaml", [entry])
    args = ("stage", "--models", str(path), "--state-dir", str(tmp_path / "state"))
    done = rackserve(*args, address=ray_cluster.address)
    assert f"tiny-e@worker: 6 files verified in {shared}" in done.stdout, done.stdout
    flip_last_byte(shared / "model-00002-of-00002.safetensors")
    refused = rackserve(*args, address=ray_cluster.address, check_code=ExitCode.FAILURE)
    assert "node worker: model 'tiny-e':" in refused.stderr, refused.stderr
    assert "model-00002-of-00002.safetensors" in refused.stderr, refused.stderr
    assert "SHA-256" in refused.stderr or "sha256" in refused.stderr.lower(), refused.stderr
