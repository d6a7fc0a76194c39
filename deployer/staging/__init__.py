"""Model weights staged onto a node: a checkpoint copied into the node's model store, verified.

The node-side library: `read_manifest` lists a checkpoint (with SHA256SUMS digests when it has
them), `verify_file`/`verify_model` check files against it (size, safetensors header, SHA-256),
and `stage_from_directory` copies a model into `<store>/<model_dir_name(model)>` atomically,
repairing only what is missing or damaged; `check_in_place` verifies a shared-filesystem copy.
`hub.py` lists a checkpoint on a hub mirror and downloads it (through `huggingface_hub`);
the rest is the standard library only. No Ray: callers run it on each node.
"""

from deployer.staging.manifest import (
    SUMS_FILE,
    FileEntry,
    Manifest,
    StagingError,
    StagingInputError,
    read_manifest,
)
from deployer.staging.store import (
    SPACE_MARGIN_BYTES,
    DiskSpaceError,
    Fetch,
    StageResult,
    amount,
    check_in_place,
    copy_from,
    model_dir_name,
    stage,
    stage_from_directory,
)
from deployer.staging.verify import verify_file, verify_model

__all__ = [
    "SPACE_MARGIN_BYTES",
    "SUMS_FILE",
    "DiskSpaceError",
    "Fetch",
    "FileEntry",
    "Manifest",
    "StageResult",
    "StagingError",
    "StagingInputError",
    "amount",
    "check_in_place",
    "copy_from",
    "model_dir_name",
    "read_manifest",
    "stage",
    "stage_from_directory",
    "verify_file",
    "verify_model",
]
