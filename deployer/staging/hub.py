"""Checkpoints staged from a Hugging Face hub or an internal mirror of it (`HF_ENDPOINT`).

`hub_checkpoint` asks the hub API once for one revision of a repo (`files_metadata`): it pins the
revision to its commit and lists the files vLLM's default loader reads, with their sizes and,
for files kept in Git LFS (the weights), their SHA-256. `from_hub` is a staging `Fetch` that
streams each file from the hub's resolve URL at that commit; a small file kept in git itself is
checked against its git blob id as it arrives. Each node fetches its own copy straight from the
mirror, so the checkpoint never passes through the head. `huggingface_hub` builds the URLs and
the headers (`HF_TOKEN` of the node that fetches) and reads the API; it is imported only here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from deployer.errors import printable, shown
from deployer.staging.manifest import (
    FileEntry,
    Manifest,
    StagingError,
    StagingInputError,
    relative_path_problem,
)
from deployer.staging.store import Fetch

HUB_TIMEOUT_S = 30.0
"""Seconds to wait for the hub to answer one request (connect, or a pause in a download)."""
_CHUNK_BYTES = 4 * 2**20

# vLLM's default loader (model_loader/default_loader.py) reads the weights of the first format
# present at the top of the checkpoint, in this order, and ignores `original/` (Llama's
# consolidated copy). Every other format's files are left on the mirror.
_WEIGHT_FORMATS = (".safetensors", ".bin", ".pt")
_OTHER_WEIGHTS = (".pth", ".h5", ".msgpack", ".onnx", ".onnx_data", ".ot", ".gguf", ".ckpt")


@dataclass(frozen=True)
class HubCheckpoint:
    """One revision of a hub repo, pinned to its commit: what `from_hub` stages from."""

    endpoint: str
    repo: str
    revision: str
    commit: str
    manifest: Manifest
    blob_ids: dict[str, str]
    """Git blob ids (SHA-1) of the listed files that have no SHA-256 (those not in LFS)."""


def served_files(names: list[str]) -> list[str]:
    """The files of a repo that vLLM's default loader reads; the rest stay on the mirror.

    Hidden files and `original/` are left out, and so are weights (by suffix) other than the
    first of `.safetensors`, `.bin`, `.pt` that the repo has at its top level.
    """
    kept = [
        name
        for name in names
        if not any(part.startswith(".") for part in PurePosixPath(name).parts)
        and not name.startswith("original/")
    ]
    top = [name for name in kept if "/" not in name]
    chosen = next((s for s in _WEIGHT_FORMATS if any(n.endswith(s) for n in top)), None)
    weights = (*_WEIGHT_FORMATS, *_OTHER_WEIGHTS)
    return sorted(
        name
        for name in kept
        if not name.endswith(weights) or (name in top and chosen and name.endswith(chosen))
    )


def _entries(model: str, siblings: list[Any], where: str) -> tuple[list[FileEntry], dict[str, str]]:
    """FileEntries and blob ids of the served files; StagingError when the listing is unusable."""
    by_name = {sibling.rfilename: sibling for sibling in siblings}
    entries: list[FileEntry] = []
    blob_ids: dict[str, str] = {}
    for name in served_files(list(by_name)):
        sibling = by_name[name]
        problem = relative_path_problem(name)
        if problem:
            raise StagingInputError(f"{where} lists a file whose path {problem}: {shown(name)}")
        lfs = sibling.lfs
        size = lfs.size if lfs is not None else sibling.size
        if not isinstance(size, int):
            raise StagingError(
                f"{where} gives no size for {shown(name)}: a hub API that answers "
                "`?blobs=true` (files' sizes and digests) is needed to stage from it"
            )
        digest = lfs.sha256.lower() if lfs is not None else None
        entries.append(FileEntry(path=name, size=size, sha256=digest))
        if digest is None and sibling.blob_id:
            blob_ids[name] = sibling.blob_id.lower()
    if not any(entry.path == "config.json" for entry in entries):
        raise StagingInputError(f"{where} has no config.json for model {shown(model)}")
    return entries, blob_ids


def hub_checkpoint(model: str, repo: str, revision: str | None, endpoint: str) -> HubCheckpoint:
    """The files of `repo` at `revision` (default `main`) on the hub at `endpoint`.

    Raises StagingInputError when the repo, revision or config.json is not there (or is gated),
    StagingError when the hub cannot be reached or answers without file sizes.
    """
    from huggingface_hub import HfApi  # noqa: PLC0415 - the hub is imported when it is used
    from huggingface_hub.errors import (  # noqa: PLC0415
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = revision or "main"
    where = f"the hub at {printable(endpoint)}, repo {shown(repo)} revision {shown(revision)}"
    try:
        info = HfApi(endpoint=endpoint).model_info(
            repo, revision=revision, files_metadata=True, timeout=HUB_TIMEOUT_S
        )
    except RevisionNotFoundError:
        raise StagingInputError(f"{where}: no such revision (branch, tag or commit)") from None
    except GatedRepoError:
        raise StagingInputError(
            f"{where}: the repo is gated; set HF_TOKEN where rackserve runs and on the nodes, "
            "for an account that was granted access"
        ) from None
    except HFValidationError as exc:
        raise StagingInputError(f"{where}: {_first_line(exc)}") from None
    except RepositoryNotFoundError:
        raise StagingInputError(
            f"{where}: no such repo (or it is private: set HF_TOKEN where rackserve runs)"
        ) from None
    except Exception as exc:  # network or server failure, whatever the HTTP client
        raise StagingError(
            f"cannot read {where}: {type(exc).__name__}: {_first_line(exc)}; check HF_ENDPOINT "
            "and that the mirror answers"
        ) from None
    if not info.sha or info.siblings is None:
        raise StagingError(f"{where} answered without a commit or a file listing")
    entries, blob_ids = _entries(model, info.siblings, where)
    return HubCheckpoint(
        endpoint=endpoint,
        repo=repo,
        revision=revision,
        commit=info.sha,
        manifest=Manifest(model=model, entries=tuple(entries)),
        blob_ids=blob_ids,
    )


def _first_line(exc: BaseException) -> str:
    return printable(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


def from_hub(checkpoint: HubCheckpoint) -> Fetch:
    """A staging Fetch streaming each file from the hub at the checkpoint's commit."""

    def fetch(entry: FileEntry, target: Path) -> None:
        from huggingface_hub import get_session, hf_hub_url, hf_raise_for_status  # noqa: PLC0415
        from huggingface_hub.utils import (  # type: ignore[attr-defined]  # noqa: PLC0415
            build_hf_headers,  # public (utils.__all__), re-exported without `as`
        )

        url = hf_hub_url(
            checkpoint.repo, entry.path, revision=checkpoint.commit, endpoint=checkpoint.endpoint
        )
        blob_id = checkpoint.blob_ids.get(entry.path)
        blob = hashlib.sha1(f"blob {entry.size}\0".encode(), usedforsecurity=False)
        content = hashlib.sha256()
        try:
            with (
                get_session().stream(
                    "GET",
                    url,
                    headers=build_hf_headers(),
                    follow_redirects=True,
                    timeout=HUB_TIMEOUT_S,
                ) as response,
                target.open("wb") as out,
            ):
                if response.status_code >= 400:
                    response.read()  # the error body, which hf_raise_for_status reads
                hf_raise_for_status(response)
                for chunk in response.iter_bytes(_CHUNK_BYTES):
                    out.write(chunk)
                    blob.update(chunk)
                    content.update(chunk)
        except OSError:
            raise  # the disk's failure: staging names it
        except Exception as exc:
            raise StagingError(
                f"downloading {printable(entry.path)} from {printable(url)}: "
                f"{type(exc).__name__}: {_first_line(exc)}"
            ) from None
        if entry.sha256 is not None and content.hexdigest() != entry.sha256:
            problem = f"its SHA-256 {content.hexdigest()}, not the {entry.sha256} the hub lists"
        elif blob_id is not None and blob.hexdigest() != blob_id:
            problem = f"its git blob id {blob.hexdigest()}, not the {blob_id} the hub lists"
        else:
            return
        raise StagingError(
            f"{printable(entry.path)} downloaded from {printable(url)} is damaged: {problem} "
            "(the mirror's copy may be corrupt: check it there)"
        )

    return fetch
