"""The models configuration: which models to serve and how, from a file or the environment.

Pure parsing lives here (`parse_models_config`, `ModelConfig`, `ModelManager`); reading a file
or the environment, and resolving relative `model_source` directories against the directory
of the file that names them, are the side effects, in `load_models`.

Every field has bounds that make physical sense (the constants below, listed in
docs/3-models-configuration.md): a value outside them is bad input, never a silently absurd
estimate.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from deployer.config.documents import decode_document, environment_text, read_input_file
from deployer.errors import ConfigError, printable, shown

KvCacheDtype = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16", "float16"]
Dtype = Literal["auto", "bfloat16", "float16", "half", "float32", "float"]
Weights = Literal["engine", "staged", "shared"]

MODEL_STORE_DIR = "/var/lib/rackserve/models"
"""Where staged weights go on each node by default (`store_dir`)."""
_NAME_LIMIT = 255  # bytes in one path component on Linux filesystems

# Keys of engine_kwargs that have a field of their own here, or that Ray Serve LLM forbids.
_ENGINE_KWARGS_OWNED = {
    "tensor_parallel_size",
    "max_model_len",
    "max_num_seqs",
    "dtype",
    "quantization",
    "kv_cache_dtype",
}
_ENGINE_KWARGS_FORBIDDEN = {"model", "served_model_name"}

MAX_MODELS = 1000
"""Most models in one configuration."""
MAX_TENSOR_PARALLEL = 64
MAX_MODEL_LEN = 2**32
MAX_NUM_SEQS = 1_000_000
MAX_GIB = 65_536.0
"""Largest per-GPU footprint or overhead in GiB (64 TiB: beyond every accelerator)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Ray Serve's own rule for route prefixes, plus no control characters or spaces.
_ROUTE_PREFIX = re.compile(r"/[^\s{}\x00-\x1f\x7f]*")


def _no_control_characters(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (tabs, newlines, escapes)")
    return value


Name = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_no_control_characters)]
"""A name or identifier: 1 to 256 characters, no control characters."""
Path_ = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_no_control_characters)]
"""A local path or hub repo id: 1 to 4096 characters, no control characters."""


class ModelConfig(BaseModel):
    """One model to serve: where it comes from, how it is sharded, and how vLLM runs it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    model_id: Name = Field(
        description="Name clients use in requests and `/v1/models`; unique in the list.",
    )
    model_source: Path_ | None = Field(
        default=None,
        description="Hugging Face repo id or local checkpoint directory (default: model_id).",
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=MAX_TENSOR_PARALLEL,
        description="GPUs per replica, all on one node; must divide the attention heads.",
    )
    max_model_len: int | None = Field(
        default=None,
        gt=0,
        le=MAX_MODEL_LEN,
        description="Longest sequence in tokens (default: the model's max_position_embeddings).",
    )
    max_num_seqs: int | None = Field(
        default=None,
        gt=0,
        le=MAX_NUM_SEQS,
        description="Concurrent sequences the KV cache is sized for (default: 1 full sequence).",
    )
    dtype: Dtype = Field(default="auto", description="Weights and activations dtype.")
    quantization: Name | None = Field(
        default=None, description="vLLM quantization method, e.g. fp8, awq, gptq (default: none)."
    )
    kv_cache_dtype: KvCacheDtype = Field(
        default="auto", description="KV cache dtype; fp8 halves the KV cache of a 16-bit model."
    )
    gpu_memory_gib: float | None = Field(
        default=None,
        gt=0,
        le=MAX_GIB,
        description="The model's whole footprint per GPU in GiB, given by hand; skips estimation.",
    )
    overhead_gib: float | None = Field(
        default=None,
        ge=0,
        le=MAX_GIB,
        description="Per-GPU engine overhead (activations, CUDA graphs, CUDA context) in GiB.",
    )
    accelerator_type: Name | None = Field(
        default=None,
        description="Only GPUs whose name contains this, e.g. H100 or A100 (default: any).",
    )
    route_prefix: str | None = Field(
        default=None,
        max_length=256,
        description="HTTP route prefix of the application (Ray Serve); one for all models.",
    )
    node: Name | None = Field(default=None, description="Pin the model to this node (by name).")
    weights: Weights = Field(
        default="engine",
        description=(
            "How the weights reach the nodes: engine (the engine loads model_source: a hub id, or "
            "a path every node has), staged (rackserve copies model_source, a local directory "
            "or a repo on the hub at HF_ENDPOINT, into store_dir on each node the model is "
            "placed on, before its engine starts), "
            "shared (model_source is on a filesystem every node mounts: checked on each placed "
            "node). staged and shared engines run with the hub offline."
        ),
    )
    revision: Name | None = Field(
        default=None,
        description="The hub revision (branch, tag or commit) staged from the hub at HF_ENDPOINT "
        "(weights: staged, model_source a repo id); default main.",
    )
    store_dir: Path_ = Field(
        default=MODEL_STORE_DIR,
        description="The nodes' directory of staged weights (absolute); a model's are in "
        "<store_dir>/<model_id, '/' as '--'>.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Passed to vLLM's engine unchanged."
    )

    @field_validator("model_id")
    @classmethod
    def _no_blank_id(cls, value: str) -> str:
        if value.strip() != value or not value.strip():
            raise ValueError("must not be blank or have leading/trailing spaces")
        return value

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix_is_a_path(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        if not _ROUTE_PREFIX.fullmatch(value):
            raise ValueError("must not contain spaces, control characters, '{' or '}'")
        if value != "/" and value.endswith("/"):
            raise ValueError("must not end with '/' (except '/' itself)")
        return value

    @field_validator("engine_kwargs")
    @classmethod
    def _engine_kwargs_do_not_shadow_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        forbidden = sorted(_ENGINE_KWARGS_FORBIDDEN & value.keys())
        if forbidden:
            raise ValueError(f"{forbidden} cannot be set: rackserve sets them from model_id")
        owned = sorted(_ENGINE_KWARGS_OWNED & value.keys())
        if owned:
            raise ValueError(f"{owned} must be set as top-level fields of the model, not here")
        return value

    @model_validator(mode="after")
    def _weights_have_a_place(self) -> ModelConfig:
        if not self.store_dir.startswith("/"):
            raise ValueError(f"store_dir must be an absolute path, not {shown(self.store_dir)}")
        if self.weights == "shared" and self.model_source is None:
            raise ValueError(
                "weights: shared needs model_source, the checkpoint directory every node mounts"
            )
        if self.weights == "shared" and not self.source.startswith("/"):
            raise ValueError(
                "weights: shared needs an absolute model_source, the same path on every node"
            )
        if self.weights == "staged":
            model_dir_name(self.model_id)  # the store can name it
        elif self.revision is not None:
            raise ValueError(
                "revision is the hub revision rackserve stages (weights: staged); an engine that "
                "downloads its own weights takes engine_kwargs: {revision: ...}"
            )
        return self

    @property
    def stages_from_hub(self) -> bool:
        """Staged from a hub repo (model_source not a path): each node downloads its copy."""
        return self.weights == "staged" and not self.source.startswith(("/", "~"))

    @property
    def source(self) -> str:
        """Where the checkpoint is: model_source, or model_id when that is not given."""
        return self.model_source or self.model_id

    @property
    def served_source(self) -> str:
        """What the engine loads: the staged copy in store_dir, else `source`."""
        if self.weights == "staged":
            return f"{self.store_dir.rstrip('/')}/{model_dir_name(self.model_id)}"
        return self.source


def model_dir_name(model: str) -> str:
    """The store directory's name for a model id: `/` becomes `--` (`org/name` -> `org--name`).

    The Hugging Face cache's convention; the hub forbids `--` in repo ids, so two of its ids
    never share a directory. An id that cannot be one safe path component raises ValueError.
    """
    parts = model.split("/")
    name = "--".join(parts)
    problem = None
    if any(part in {"", ".", ".."} for part in parts):
        problem = "it is empty, or has an empty, '.' or '..' part"
    elif printable(model) != model or "\x00" in model:
        problem = "it holds control characters"
    elif name.startswith("."):
        problem = "it starts with '.', which the store keeps for staging's temporaries"
    elif len(name.encode("utf-8", "surrogateescape")) > _NAME_LIMIT:
        problem = f"the directory name would be longer than {_NAME_LIMIT} bytes"
    if problem:
        raise ValueError(f"model id {shown(model)} cannot name a store directory: {problem}")
    return name


def _field_names() -> list[str]:
    return list(ModelConfig.model_fields)


class ModelManager:
    """An ordered registry of models keyed by model_id; rejects duplicate ids."""

    def __init__(self, models: list[ModelConfig] | None = None) -> None:
        self._models: dict[str, ModelConfig] = {}
        for model in models or []:
            self.add(model)

    def add(self, model: ModelConfig) -> None:
        """Register a model; a second model with the same id is an error."""
        if model.model_id in self._models:
            raise ConfigError(f"duplicate model_id {model.model_id!r}", source="models config")
        self._models[model.model_id] = model

    def get(self, model_id: str) -> ModelConfig:
        """The model with this id."""
        try:
            return self._models[model_id]
        except KeyError:
            known = ", ".join(self._models) or "none"
            raise ConfigError(
                f"no model {model_id!r} (known: {known})", source="models config"
            ) from None

    def remove(self, model_id: str) -> ModelConfig:
        """Unregister a model and return it."""
        model = self.get(model_id)
        del self._models[model_id]
        return model

    def list(self) -> list[ModelConfig]:
        """The models in the order they were added."""
        return list(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def __iter__(self) -> Iterator[ModelConfig]:
        return iter(self.list())

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models


def _describe_error(error: Mapping[str, Any]) -> str:
    """One pydantic error as 'field: what is wrong (got X)'."""
    loc = printable(".".join(str(part) for part in error["loc"]))[:120] or "(model)"
    kind = error["type"]
    if kind == "extra_forbidden":
        field = error["loc"][0]
        close = difflib.get_close_matches(str(field), _field_names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown field {shown(field)}{hint} (known fields: {', '.join(_field_names())})"
    if kind == "missing":
        return f"{loc}: is required"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{loc}: {message} (got {shown(error['input'])})"


def _model_label(index: int, raw: object) -> str:
    model_id = raw.get("model_id") if isinstance(raw, dict) else None
    return (
        f"models[{index}] (id {shown(model_id)})"
        if isinstance(model_id, str)
        else f"models[{index}]"
    )


def _keys(document: Mapping[Any, Any]) -> str:
    keys = [shown(key) for key in list(document)[:5]]
    return ", ".join(keys) + (", ..." if len(document) > 5 else "")


def parse_models_config(text: str, source: str = "models config") -> ModelManager:
    """Parse a models configuration (YAML or JSON) into a registry.

    Accepts a mapping with a top-level `models:` list, or the list itself (the form of the
    `MODELS_CONFIG` environment variable). Every problem in every model is reported at once,
    each naming the model (index and id) and the field. Models that set `route_prefix` must
    all set the same one: it is one setting of the application that serves them all.
    """
    document = decode_document(text, source)
    if isinstance(document, dict):
        if "models" not in document:
            raise ConfigError(
                "expected a top-level key 'models' holding a list (found keys: "
                f"{_keys(document) or 'none'})",
                source=source,
            )
        unknown = {key: None for key in document if key != "models"}
        if unknown:
            raise ConfigError(
                f"unknown top-level keys {_keys(unknown)}; only 'models' is read", source=source
            )
        document = document["models"]
    if not isinstance(document, list):
        raise ConfigError(
            f"expected a list of models, got {type(document).__name__}", source=source
        )
    if not document:
        raise ConfigError("the list of models is empty", source=source)
    if len(document) > MAX_MODELS:
        raise ConfigError(
            f"{len(document)} models; the limit is {MAX_MODELS} per configuration", source=source
        )

    problems: list[str] = []
    models: list[ModelConfig] = []
    first_index: dict[str, int] = {}
    for index, raw in enumerate(document):
        label = _model_label(index, raw)
        if not isinstance(raw, dict):
            problems.append(f"{label}: expected a mapping of fields, got {type(raw).__name__}")
            continue
        model_id = raw.get("model_id")
        if isinstance(model_id, str) and model_id in first_index:
            problems.append(
                f"{label}: duplicate model_id (also models[{first_index[model_id]}]); "
                "model ids must be unique"
            )
        elif isinstance(model_id, str):
            first_index[model_id] = index
        try:
            models.append(ModelConfig.model_validate(raw))
        except ValidationError as exc:
            problems.extend(f"{label}: {_describe_error(err)}" for err in exc.errors())
    problems.extend(_route_prefix_problems(models))
    if problems:
        raise ConfigError(problems, source=source)
    return ModelManager(models)


def _route_prefix_problems(models: list[ModelConfig]) -> list[str]:
    """route_prefix is one setting of the application: the models that set it must agree."""
    first: dict[str, str] = {}
    for model in models:
        if model.route_prefix is not None:
            first.setdefault(model.route_prefix, model.model_id)
    if len(first) <= 1:
        return []
    given = ", ".join(f"{shown(prefix)} (id {shown(mid)})" for prefix, mid in first.items())
    return [
        f"route_prefix: the models ask for different values ({given}); all models are served "
        "by one application under one route prefix: give them one route_prefix, or none"
    ]


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    if not re.fullmatch(r"\+?[0-9]{1,12}", value.strip()):
        raise ConfigError(
            f"{name} must be a positive integer (got {shown(value)})", source="environment"
        )
    return int(value)


def models_from_environment(environ: Mapping[str, str]) -> ModelManager | None:
    """`MODELS_CONFIG` (JSON or YAML), else single-model mode from `MODEL_ID`; None if neither."""
    if environ.get("MODELS_CONFIG"):
        text = environment_text("MODELS_CONFIG", environ["MODELS_CONFIG"])
        return parse_models_config(text, source="MODELS_CONFIG")
    model_id = environ.get("MODEL_ID")
    if not model_id:
        return None
    raw: dict[str, Any] = {"model_id": environment_text("MODEL_ID", model_id)}
    for name, field in (
        ("TENSOR_PARALLEL_SIZE", "tensor_parallel_size"),
        ("MAX_MODEL_LEN", "max_model_len"),
    ):
        number = _env_int(environ, name)
        if number is not None:
            raw[field] = number
    return parse_models_config(json.dumps([raw]), source="MODEL_ID environment")


def local_directory(source: str, base: Path) -> Path | None:
    """The local directory a relative model source names, read from `base`; else None.

    `./dir` and `../dir` are paths whatever exists; `org/name` is a directory if `base/org/name`
    is one, else a Hugging Face repo id. Absolute and `~` paths are left as they are (None).
    """
    if source.startswith(("/", "~")):
        return None
    if source in {".", ".."} or source.startswith(("./", "../")):
        return base / source
    try:
        return base / source if (base / source).is_dir() else None
    except (OSError, ValueError):  # a name too long for the filesystem: not a directory
        return None


def _resolve_sources(models: ModelManager, base: Path) -> ModelManager:
    """The models with relative local `model_source` directories made absolute from `base`."""
    resolved = []
    for model in models:
        directory = local_directory(model.source, base)
        if directory is None:
            resolved.append(model)
        else:
            resolved.append(model.model_copy(update={"model_source": os.path.abspath(directory)}))
    return ModelManager(resolved)


def load_models(path: Path | None, environ: Mapping[str, str] | None = None) -> ModelManager:
    """The models to serve: `--models FILE`, else `MODELS_CONFIG`, else `MODEL_ID`.

    A relative local `model_source` is read from the models file's directory (from the current
    directory for the environment variables) and made absolute, so that the engines find it.
    """
    environ = os.environ if environ is None else environ
    if path is not None:
        models = parse_models_config(read_input_file(path, "--models"), source=f"--models {path}")
        return _resolve_sources(models, path.parent)
    from_environment = models_from_environment(environ)
    if from_environment is None:
        raise ConfigError(
            "no models given: pass --models FILE, or set MODELS_CONFIG (the models as JSON or "
            "YAML) or MODEL_ID in the environment"
        )
    return _resolve_sources(from_environment, Path.cwd())
