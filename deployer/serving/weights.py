"""Model weights onto the nodes the plan places them on, through Ray, before engines start.

For each engine about to start of a model with `weights: staged`, a Ray task on the engine's
node puts the checkpoint into that node's store (`deployer.staging.stage`: space checked first,
verified, renamed into place, a second run copies nothing). The bytes come in chunks through
Ray's object store from a reader actor on the node this process runs on (the head), where the
local directory `model_source` is; a `model_source` that is a hub repo id is downloaded by each
node straight from the hub at this process's `HF_ENDPOINT` (an internal mirror), pinned to one
commit. For `weights: shared`, a task on each node verifies the shared copy in place. Every
task runs before any engine stops or starts, so a failure changes nothing; every failure is
reported at once, naming node, model and what is wrong.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deployer.config.cluster import Cluster
from deployer.config.models_config import ModelConfig, ModelManager
from deployer.errors import ExitCode
from deployer.planning.serve_config import EngineSpec, node_selector
from deployer.serving.probe import task_error
from deployer.staging import (
    FileEntry,
    Manifest,
    StageResult,
    StagingError,
    StagingInputError,
    amount,
    check_in_place,
    read_manifest,
    stage,
)
from deployer.staging.hub import HubCheckpoint, from_hub, hub_checkpoint

Say = Callable[[str], None]

CHUNK_BYTES = 16 * 2**20
"""Bytes of one read from the reader actor: one object in Ray's object store."""
CHUNKS_IN_FLIGHT = 4
"""Reads a staging task keeps asked ahead, so the transfer never waits on one round trip."""
STAGE_TIMEOUT_S = 3600.0
"""How long all staging of one deploy may take (the copies run in parallel across nodes)."""


class CheckpointReader:
    """Reads the checkpoints staged from this node (a Ray actor beside the deploying process)."""

    def __init__(self, sources: dict[str, str]) -> None:
        self._sources = {model: Path(directory) for model, directory in sources.items()}

    def manifest(self, model: str) -> Manifest:
        """The model's checkpoint listing (sizes, SHA256SUMS digests where listed)."""
        return read_manifest(self._sources[model], model)

    def read(self, model: str, path: str, offset: int, length: int) -> bytes:
        """`length` bytes of one file of the model's checkpoint, from `offset`."""
        with (self._sources[model] / path).open("rb") as source:
            source.seek(offset)
            return source.read(length)


def _pulled(reader: Any, model: str) -> Callable[[FileEntry, Path], None]:
    """A staging fetch that writes each file from the reader's chunks, a few asked ahead."""
    import ray

    def fetch(entry: FileEntry, target: Path) -> None:
        asked: collections.deque[Any] = collections.deque()
        offset = 0
        with target.open("wb") as out:
            while offset < entry.size or asked:
                while offset < entry.size and len(asked) < CHUNKS_IN_FLIGHT:
                    length = min(CHUNK_BYTES, entry.size - offset)
                    asked.append(reader.read.remote(model, entry.path, offset, length))
                    offset += length
                out.write(ray.get(asked.popleft()))

    return fetch


def _ran_on() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _stage_here(reader: Any, manifest: Manifest, store_dir: str, node: str) -> Any:
    """On the engine's node: put the checkpoint in its store. Returns (Ray node id, result)."""
    return _ran_on(), stage(manifest, _pulled(reader, manifest.model), Path(store_dir), node=node)


def _stage_from_hub(checkpoint: HubCheckpoint, store_dir: str, node: str) -> Any:
    """On the engine's node: download the checkpoint from the hub into its store."""
    fetch = from_hub(checkpoint)
    return _ran_on(), stage(checkpoint.manifest, fetch, Path(store_dir), node=node)


def _check_here(directory: str, model: str, node: str) -> Any:
    """On the engine's node: verify a shared checkpoint. Returns (Ray node id, result)."""
    return _ran_on(), check_in_place(Path(directory), model, node=node)


def _failure(exc: BaseException) -> tuple[str, bool]:
    """(message, whether it is the input's fault) of a staging task's failure."""
    import ray

    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else None
    if isinstance(cause, StagingError):
        return str(cause), cause.exit_code == ExitCode.BAD_INPUT
    return task_error(exc), False


def stage_weights(
    specs: Sequence[EngineSpec],
    models: ModelManager,
    cluster: Cluster,
    say: Say,
    timeout_s: float = STAGE_TIMEOUT_S,
) -> list[StageResult]:
    """Stage (or check) the weights of every engine in `specs` on its node; connected to Ray.

    Engines of `weights: engine` models are skipped. Raises StagingError naming every node and
    model that failed (StagingInputError when a checkpoint itself is wrong); nothing else
    changes.
    """
    import ray

    wanted = [(s, models.get(s.model_id)) for s in specs]
    wanted = [(s, m) for s, m in wanted if m.weights != "engine"]
    if not wanted:
        return []
    staged = {
        m.model_id: m.source for _, m in wanted if m.weights == "staged" and not m.stages_from_hub
    }
    checkpoints = _hub_checkpoints([m for _, m in wanted if m.stages_from_hub])
    reader = _reader(staged) if staged else None
    try:
        manifests = _manifests(reader, staged, timeout_s)
        started = time.monotonic()
        pending = _start(wanted, manifests, checkpoints, reader, cluster)
        say(f"staging weights: {', '.join(f'{s.model_id}@{s.node}' for s, _ in pending.values())}")
        results = _collect(pending, cluster, say, timeout_s)
    finally:
        if reader is not None:
            ray.kill(reader)
    say(f"weights ready on every node in {time.monotonic() - started:.1f} s")
    return results


def _reader(staged: dict[str, str]) -> Any:
    """A CheckpointReader actor on this process's node, where the checkpoints are."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(_ran_on(), soft=False)
    actor = ray.remote(CheckpointReader).options(num_cpus=0, scheduling_strategy=here)
    return actor.remote(staged)


def _manifests(reader: Any, staged: dict[str, str], timeout_s: float) -> dict[str, Manifest]:
    """Each staged model's listing, read beside its checkpoint; every problem at once."""
    import ray

    refs = {model: reader.manifest.remote(model) for model in staged}
    manifests: dict[str, Manifest] = {}
    problems = []
    for model, ref in refs.items():
        try:
            manifests[model] = ray.get(ref, timeout=timeout_s)
        except Exception as exc:  # a StagingError inside the actor, or Ray's own
            problems.append(f"model {model!r}, from {staged[model]}: {_failure(exc)[0]}")
    if problems:
        raise StagingInputError(
            "cannot read the checkpoints to stage; nothing was started or stopped:\n  "
            + "\n  ".join(problems)
        )
    return manifests


def _hub_checkpoints(models: Sequence[ModelConfig]) -> dict[str, HubCheckpoint]:
    """Each hub-staged model's commit and files, from the hub at HF_ENDPOINT; all problems at once.

    Asked here, once per model, so that every node downloads the same commit.
    """
    if not models:
        return {}
    from huggingface_hub import constants  # noqa: PLC0415 - only when a model needs the hub

    names = ", ".join(repr(m.model_id) for m in models)
    if constants.HF_HUB_OFFLINE:
        raise StagingInputError(
            f"HF_HUB_OFFLINE is set, but {names} {'is' if len(models) == 1 else 'are'} staged "
            "from the hub (model_source is not a local directory); unset it and point "
            "HF_ENDPOINT at the mirror, or stage from a local directory. Nothing was started or "
            "stopped"
        )
    checkpoints: dict[str, HubCheckpoint] = {}
    problems: list[str] = []
    bad_input = False
    for model in models:
        try:
            checkpoints[model.model_id] = hub_checkpoint(
                model.model_id, model.source, model.revision, constants.ENDPOINT
            )
        except StagingError as exc:
            bad_input = bad_input or isinstance(exc, StagingInputError)
            problems.append(f"model {model.model_id!r}: {exc}")
    if problems:
        error = StagingInputError if bad_input else StagingError
        raise error(
            "cannot list the checkpoints to stage from the hub (a model_source that is not a "
            "local directory is read as a hub repo id); nothing was started or stopped:\n  "
            + "\n  ".join(problems)
        )
    return checkpoints


def _start(
    wanted: Sequence[tuple[EngineSpec, ModelConfig]],
    manifests: dict[str, Manifest],
    checkpoints: dict[str, HubCheckpoint],
    reader: Any,
    cluster: Cluster,
) -> dict[Any, tuple[EngineSpec, str]]:
    """One task per engine on its node (by its label): stage, or check a shared copy."""
    import ray

    nodes = {node.name: node for node in cluster.nodes}
    task_stage = ray.remote(_stage_here)
    task_hub = ray.remote(_stage_from_hub)
    task_check = ray.remote(_check_here)
    pending: dict[Any, tuple[EngineSpec, str]] = {}
    for spec, model in wanted:
        options: dict[str, Any] = {
            "num_cpus": 0,
            "max_retries": 0,
            "label_selector": node_selector(nodes[spec.node]),
            "name": f"rackserve-stage:{model.model_id}@{spec.node}",
        }
        if model.stages_from_hub:
            checkpoint = checkpoints[model.model_id]
            ref = task_hub.options(**options).remote(checkpoint, model.store_dir, spec.node)
            origin = f"from {checkpoint.endpoint} {checkpoint.repo}@{checkpoint.commit[:12]}"
        elif model.weights == "staged":
            origin = ""
            ref = task_stage.options(**options).remote(
                reader, manifests[model.model_id], model.store_dir, spec.node
            )
        else:
            origin = "shared"
            ref = task_check.options(**options).remote(model.source, model.model_id, spec.node)
        pending[ref] = (spec, origin)
    return pending


def _collect(
    pending: dict[Any, tuple[EngineSpec, str]], cluster: Cluster, say: Say, timeout_s: float
) -> list[StageResult]:
    """The tasks' results, said as they are; StagingError listing every failure."""
    import ray

    nodes = {node.name: node for node in cluster.nodes}
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    problems = []
    for ref in late:
        ray.cancel(ref, force=True)
        spec, _ = pending[ref]
        problems.append(f"node {spec.node}: model {spec.model_id!r}: not done within "
                        f"{timeout_s:.0f} s")  # fmt: skip
    results: list[StageResult] = []
    bad_input = False
    for ref in ready:
        spec, origin = pending[ref]
        try:
            ran_on, result = ray.get(ref)
        except Exception as exc:
            message, input_fault = _failure(exc)
            bad_input = bad_input or input_fault
            problems.append(message)
            continue
        expected = nodes[spec.node].ray_node_id
        if expected and ran_on != expected:
            problems.append(f"node {spec.node}: the staging of {spec.model_id!r} ran on Ray "
                            f"node {ran_on} instead")  # fmt: skip
            continue
        results.append(result)
        say(_done(result, origin))
    if problems:
        error = StagingInputError if bad_input else StagingError
        raise error(
            f"staging failed for {len(problems)} of {len(pending)} engine(s); nothing was "
            "started or stopped:\n  " + "\n  ".join(problems)
        )
    return results


def _done(result: StageResult, origin: str) -> str:
    """One line per engine: `origin` is "shared", "from HUB REPO@COMMIT" or "" (a local copy)."""
    where = f"  {result.model}@{result.node}"
    if origin == "shared":
        return f"{where}: {result.kept_files} files verified in {result.path}"
    source = f" {origin}" if origin else ""
    if result.copied_files == 0:
        return f"{where}: already staged{source} ({result.kept_files} files verified)"
    return (
        f"{where}: copied {result.copied_files} files{source} "
        f"({amount(result.copied_bytes)}), kept {result.kept_files}, in {result.path}"
    )
