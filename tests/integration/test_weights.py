"""`rackserve stage` puts `weights: staged` models on their planned nodes, through a real local
Ray cluster (a head and a worker on loopback, both on this machine's disk), from a local
directory, from a hub mirror (tools/hub_mirror.py, driven by the real `huggingface_hub`), and in
place on a shared path. `deploy` staging before its engines start is tested on the
rack-in-a-box (tests/rack/test_site.py).

Each model's store directory is its own, so the files of each show which node's task wrote
them; the command's own lines say where each copy ran, and the staging code checks that the
task ran on the planned Ray node. The stores are tmpfs mounts, so a full disk is real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import snapshot_download

from deployer.errors import ExitCode
from deployer.staging import Manifest, read_manifest, verify_model
from tests.checkpoints import flip_last_byte, write_checkpoint, write_sums
from tests.conftest import Mount
from tools.hub_mirror import HubMirror, hub_mirror
from tools.local_ray import RayCluster

pytestmark = pytest.mark.integration

RACKSERVE = [sys.executable, "-m", "deployer"]


def rackserve(
    *args: str, address: str, check_code: int | None = 0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`rackserve ARGS` against the cluster, as an operator runs it on the head."""
    env = {**os.environ, "RAY_ADDRESS": address, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
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


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[HubMirror]:
    """A hub mirror with two repos of the same shape (the second with a README and a .bin)."""
    second = write_checkpoint(tmp_path / "hub" / "tiny-g")
    (second / "README.md").write_text("# tiny-g\n")
    (second / "pytorch_model.bin").write_bytes(b"left on the mirror: safetensors are served")
    repos = {"org/tiny-f": write_checkpoint(tmp_path / "hub" / "tiny-f"), "org/tiny-g": second}
    with hub_mirror(repos) as served:
        yield served


def test_the_mirror_serves_what_the_real_hub_client_downloads(
    mirror: HubMirror, tmp_path: Path
) -> None:
    local = Path(snapshot_download("org/tiny-g", endpoint=mirror.endpoint,
                                   local_dir=tmp_path / "dl"))  # fmt: skip
    source = tmp_path / "hub" / "tiny-g"
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in source.iterdir()
    )
    assert verify_model(local, read_manifest(source, "org/tiny-g")) == []


def hub_staged(model_id: str, store: Path, node: str, **fields: str) -> dict[str, Any]:
    return {"model_id": model_id, "weights": "staged", "store_dir": str(store), "node": node,
            "gpu_memory_gib": 0.5, **fields}  # fmt: skip


def test_each_node_downloads_its_models_from_the_hub_mirror_once(
    ray_cluster: RayCluster, mirror: HubMirror, tmp_path: Path, tmpfs: Mount
) -> None:
    stores = {"org/tiny-f": tmpfs("size=80m"), "org/tiny-g": tmpfs("size=80m")}
    path = models_file(tmp_path / "models.yaml", [
        hub_staged("org/tiny-f", stores["org/tiny-f"], "head"),
        hub_staged("tiny-g", stores["org/tiny-g"], "worker", model_source="org/tiny-g",
                   revision="main"),
    ])  # fmt: skip
    args = ("stage", "--models", str(path), "--state-dir", str(tmp_path / "state"))
    hub = {"HF_ENDPOINT": mirror.endpoint}
    out = rackserve(*args, address=ray_cluster.address, env=hub).stdout
    expected = {"org/tiny-f": ("org/tiny-f", "head"), "org/tiny-g": ("tiny-g", "worker")}
    for repo, (model, node) in expected.items():
        commit = mirror.commits[repo][:12]
        source = tmp_path / "hub" / repo.removeprefix("org/")
        listed = read_manifest(source, repo)
        served = [f for f in listed.entries if f.path != "pytorch_model.bin"]
        line = f"{model}@{node}: copied {len(served)} files from {mirror.endpoint} {repo}@{commit}"
        assert line in out, out
        directory = stores[repo] / model.replace("/", "--")
        assert os.listdir(stores[repo]) == [directory.name], "one model, no temporaries"
        assert verify_model(directory, Manifest(repo, tuple(served))) == []
        assert sorted(os.listdir(directory)) == sorted(f.path for f in served)
        assert sorted(f for r, f in mirror.downloads if r == repo) == sorted(f.path for f in served)

    fetched = len(mirror.downloads)
    again = rackserve(*args, address=ray_cluster.address, env=hub).stdout
    assert "org/tiny-f@head: already staged from" in again, again
    assert "tiny-g@worker: already staged from" in again, again
    assert len(mirror.downloads) == fetched, "a second run downloads nothing"


def test_a_damaged_download_from_the_mirror_leaves_nothing_in_the_store(
    ray_cluster: RayCluster, mirror: HubMirror, tmp_path: Path, tmpfs: Mount
) -> None:
    store = tmpfs("size=80m")
    mirror.damaged.add(("org/tiny-f", "model-00002-of-00002.safetensors"))
    path = models_file(tmp_path / "models.yaml", [hub_staged("org/tiny-f", store, "worker")])
    done = rackserve("stage", "--models", str(path), "--state-dir", str(tmp_path / "state"),
                     address=ray_cluster.address, check_code=ExitCode.FAILURE,
                     env={"HF_ENDPOINT": mirror.endpoint})  # fmt: skip
    message = done.stderr
    assert "node worker: model 'org/tiny-f': model-00002-of-00002.safetensors downloaded" in message
    assert "is damaged: its SHA-256" in message, message
    assert "nothing of it was left" in message, message
    assert os.listdir(store) == []


BAD_INPUT, FAILURE = ExitCode.BAD_INPUT, ExitCode.FAILURE


@pytest.mark.parametrize(
    ("fields", "env", "code", "problem"),
    [
        pytest.param({"model_source": "org/nope"}, {}, BAD_INPUT,
                     "repo 'org/nope' revision 'main': no such repo", id="unknown-repo"),
        pytest.param({"revision": "v9"}, {}, BAD_INPUT, "revision 'v9': no such revision",
                     id="unknown-revision"),
        pytest.param({}, {"HF_HUB_OFFLINE": "1"}, BAD_INPUT,
                     "HF_HUB_OFFLINE is set, but 'org/tiny-f'", id="hub-off"),
        pytest.param({}, {"HF_ENDPOINT": "http://127.0.0.1:9"}, FAILURE,
                     "cannot read the hub at http://127.0.0.1:9", id="mirror-down"),
    ],
)  # fmt: skip
def test_a_hub_source_that_cannot_be_read_is_refused_before_any_copy(
    ray_cluster: RayCluster, mirror: HubMirror, tmp_path: Path, tmpfs: Mount,
    fields: dict[str, str], env: dict[str, str], code: int, problem: str,
) -> None:  # fmt: skip
    store = tmpfs("size=80m")
    path = models_file(tmp_path / "models.yaml",
                       [hub_staged("org/tiny-f", store, "worker", **fields)])  # fmt: skip
    done = rackserve("stage", "--models", str(path), "--state-dir", str(tmp_path / "state"),
                     address=ray_cluster.address, check_code=code,
                     env={"HF_ENDPOINT": mirror.endpoint, **env})  # fmt: skip
    assert problem in done.stderr, done.stderr
    assert "nothing was started or stopped" in done.stderr.lower(), done.stderr
    assert os.listdir(store) == []
    assert mirror.downloads == []
