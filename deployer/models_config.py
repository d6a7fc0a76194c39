"""The models configuration: which models to serve and how, from a file or the environment.

Pure parsing lives here (`parse_models_config`, `ModelConfig`, `ModelManager`); reading a file
or the environment is the one side effect, in `load_models`.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deployer.documents import decode_document, read_input_file
from deployer.errors import ConfigError

KvCacheDtype = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16", "float16"]
Dtype = Literal["auto", "bfloat16", "float16", "half", "float32", "float"]

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


class ModelConfig(BaseModel):
    """One model to serve: where it comes from, how it is sharded, and how vLLM runs it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model_id: str = Field(
        min_length=1,
        description="Name clients use in requests and `/v1/models`; unique in the list.",
    )
    model_source: str | None = Field(
        default=None,
        description="Hugging Face repo id or local checkpoint directory (default: model_id).",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="GPUs per replica, all on one node; must divide the heads."
    )
    max_model_len: int | None = Field(
        default=None,
        gt=0,
        description="Longest sequence in tokens (default: the model's max_position_embeddings).",
    )
    max_num_seqs: int | None = Field(
        default=None,
        gt=0,
        description="Concurrent sequences the KV cache is sized for (default: 1 full sequence).",
    )
    dtype: Dtype = Field(default="auto", description="Weights and activations dtype.")
    quantization: str | None = Field(
        default=None, description="vLLM quantization method, e.g. fp8, awq, gptq (default: none)."
    )
    kv_cache_dtype: KvCacheDtype = Field(
        default="auto", description="KV cache dtype; fp8 halves the KV cache of a 16-bit model."
    )
    gpu_memory_gib: float | None = Field(
        default=None,
        gt=0,
        description="The model's whole footprint per GPU in GiB, given by hand; skips estimation.",
    )
    overhead_gib: float | None = Field(
        default=None,
        ge=0,
        description="Per-GPU engine overhead (activations, CUDA graphs, CUDA context) in GiB.",
    )
    accelerator_type: str | None = Field(
        default=None,
        min_length=1,
        description="Only GPUs whose name contains this, e.g. H100 or A100 (default: any).",
    )
    route_prefix: str | None = Field(
        default=None, description="HTTP route prefix of the application (Ray Serve)."
    )
    node: str | None = Field(
        default=None, min_length=1, description="Pin the model to this node (by name)."
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
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must start with '/' (got {value!r})")
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

    @property
    def source(self) -> str:
        """Where the checkpoint is: model_source, or model_id when that is not given."""
        return self.model_source or self.model_id


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
    loc = ".".join(str(part) for part in error["loc"]) or "(model)"
    kind = error["type"]
    if kind == "extra_forbidden":
        field = str(error["loc"][0])
        close = difflib.get_close_matches(field, _field_names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown field {field!r}{hint} (known fields: {', '.join(_field_names())})"
    if kind == "missing":
        return f"{loc}: is required"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{loc}: {message} (got {error['input']!r})"


def _model_label(index: int, raw: object) -> str:
    model_id = raw.get("model_id") if isinstance(raw, dict) else None
    return f"models[{index}] (id {model_id!r})" if isinstance(model_id, str) else f"models[{index}]"


def parse_models_config(text: str, source: str = "models config") -> ModelManager:
    """Parse a models configuration (YAML or JSON) into a registry.

    Accepts a mapping with a top-level `models:` list, or the list itself (the form of the
    `MODELS_CONFIG` environment variable). Every problem in every model is reported at once,
    each naming the model (index and id) and the field.
    """
    if not text.strip():
        raise ConfigError("it is empty; expected a list of models", source=source)
    document = decode_document(text, source)
    if isinstance(document, dict):
        if "models" not in document:
            raise ConfigError(
                f"expected a top-level key 'models' holding a list (found keys: "
                f"{', '.join(map(str, document)) or 'none'})",
                source=source,
            )
        unknown = sorted(set(map(str, document)) - {"models"})
        if unknown:
            raise ConfigError(
                f"unknown top-level keys {unknown}; only 'models' is read", source=source
            )
        document = document["models"]
    if not isinstance(document, list):
        raise ConfigError(
            f"expected a list of models, got {type(document).__name__}", source=source
        )
    if not document:
        raise ConfigError("the list of models is empty", source=source)

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
    if problems:
        raise ConfigError(problems, source=source)
    return ModelManager(models)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(
            f"{name} must be an integer (got {value!r})", source="environment"
        ) from None
    return number


def models_from_environment(environ: Mapping[str, str]) -> ModelManager | None:
    """`MODELS_CONFIG` (a JSON list), else single-model mode from `MODEL_ID`; None if neither."""
    if environ.get("MODELS_CONFIG"):
        return parse_models_config(environ["MODELS_CONFIG"], source="MODELS_CONFIG")
    model_id = environ.get("MODEL_ID")
    if not model_id:
        return None
    raw: dict[str, Any] = {"model_id": model_id}
    for name, field in (
        ("TENSOR_PARALLEL_SIZE", "tensor_parallel_size"),
        ("MAX_MODEL_LEN", "max_model_len"),
    ):
        number = _env_int(environ, name)
        if number is not None:
            raw[field] = number
    return parse_models_config(json.dumps([raw]), source="MODEL_ID environment")


def load_models(path: Path | None, environ: Mapping[str, str] | None = None) -> ModelManager:
    """The models to serve: `--models FILE`, else `MODELS_CONFIG`, else `MODEL_ID`."""
    environ = os.environ if environ is None else environ
    if path is not None:
        return parse_models_config(read_input_file(path, "--models"), source=str(path))
    models = models_from_environment(environ)
    if models is None:
        raise ConfigError(
            "no models given: pass --models FILE, or set MODELS_CONFIG (a JSON list) "
            "or MODEL_ID in the environment"
        )
    return models
