"""The models configuration: sources, precedence, the registry and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deployer.config.models_config import (
    ModelConfig,
    ModelManager,
    load_models,
    parse_models_config,
)
from deployer.errors import ConfigError, ExitCode

pytestmark = pytest.mark.unit

MULTI = """
models:
  - model_id: llama-8b
    model_source: meta-llama/Llama-3.1-8B-Instruct
    max_model_len: 8192
    max_num_seqs: 32
    kv_cache_dtype: fp8
  - model_id: qwen-moe
    model_source: /models/Qwen3-30B-A3B
    tensor_parallel_size: 2
    engine_kwargs: {enable_prefix_caching: true}
"""

SEED_EXAMPLE = json.dumps(
    [
        {
            "model_id": "qwen-0.5b",
            "model_source": "Qwen/Qwen2.5-0.5B-Instruct",
            "tensor_parallel_size": 1,
            "max_model_len": 4096,
            "route_prefix": "/qwen",
            "accelerator_type": None,
        },
        {"model_id": "llama-1b", "model_source": "meta-llama/Llama-3.2-1B-Instruct"},
    ]
)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_models_config(text)
    assert error.value.exit_code == ExitCode.BAD_INPUT
    return error.value.problems


def test_yaml_file_with_several_models() -> None:
    models = parse_models_config(MULTI)
    assert [m.model_id for m in models] == ["llama-8b", "qwen-moe"]
    llama, qwen = models.list()
    assert llama.kv_cache_dtype == "fp8"
    assert llama.tensor_parallel_size == 1
    assert qwen.source == "/models/Qwen3-30B-A3B"
    assert qwen.engine_kwargs == {"enable_prefix_caching": True}


def test_seed_models_config_json_parses() -> None:
    models = parse_models_config(SEED_EXAMPLE, source="MODELS_CONFIG")
    first = models.get("qwen-0.5b")
    assert first.route_prefix == "/qwen"
    assert first.accelerator_type is None
    assert models.get("llama-1b").source == "meta-llama/Llama-3.2-1B-Instruct"


def test_model_source_defaults_to_model_id() -> None:
    assert ModelConfig(model_id="org/model").source == "org/model"


def test_precedence_file_then_models_config_then_model_id(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(MULTI)
    environ = {"MODELS_CONFIG": SEED_EXAMPLE, "MODEL_ID": "solo"}
    assert [m.model_id for m in load_models(path, environ)] == ["llama-8b", "qwen-moe"]
    assert [m.model_id for m in load_models(None, environ)] == ["qwen-0.5b", "llama-1b"]
    del environ["MODELS_CONFIG"]
    assert [m.model_id for m in load_models(None, environ)] == ["solo"]


def test_single_model_mode_from_environment() -> None:
    environ = {"MODEL_ID": "org/m", "TENSOR_PARALLEL_SIZE": "4", "MAX_MODEL_LEN": "2048"}
    (model,) = load_models(None, environ)
    assert (model.model_id, model.tensor_parallel_size, model.max_model_len) == ("org/m", 4, 2048)
    with pytest.raises(
        ConfigError, match=r"TENSOR_PARALLEL_SIZE must be a positive integer \(got 'four'\)"
    ):
        load_models(None, {"MODEL_ID": "m", "TENSOR_PARALLEL_SIZE": "four"})
    with pytest.raises(
        ConfigError, match="tensor_parallel_size: Input should be greater than or equal to 1"
    ):
        load_models(None, {"MODEL_ID": "m", "TENSOR_PARALLEL_SIZE": "0"})


def test_no_source_at_all_says_what_to_set() -> None:
    with pytest.raises(
        ConfigError, match=r"pass --models FILE, or set MODELS_CONFIG .* or MODEL_ID"
    ):
        load_models(None, {})


def test_unreadable_file_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"--models .*nope\.yaml: it cannot be read: No such file"
    ):
        load_models(tmp_path / "nope.yaml", {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models: [{model_id: a", "not valid YAML: did not find expected ',' or '}' at line"),
        ('[{"model_id": "a",]', "not valid JSON (Expecting property name"),
        ("", "it is empty"),
        ("models: {model_id: a}", "expected a list of models, got dict"),
        ("just a string", "expected a list of models, got str"),
        ("other: []", "expected a top-level key 'models' holding a list (found keys: 'other')"),
        ("models: []", "the list of models is empty"),
        ("models: [{model_id: a}]\nextra: 1", "unknown top-level keys 'extra'"),
    ],
)
def test_malformed_documents(text: str, expected: str) -> None:
    (problem,) = problems(text)
    assert expected in problem


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            {"model_id": "a", "tensor_paralel_size": 2},
            "models[0] (id 'a'): unknown field 'tensor_paralel_size'; "
            "did you mean 'tensor_parallel_size'?",
        ),
        (
            {"model_id": "a", "max_model_len": "4k"},
            "models[0] (id 'a'): max_model_len: Input should be a valid integer (got '4k')",
        ),
        (
            {"model_id": "a", "tensor_parallel_size": 2.0},
            "models[0] (id 'a'): tensor_parallel_size: Input should be a valid integer (got 2.0)",
        ),
        (
            {"model_id": "a", "tensor_parallel_size": 0},
            "models[0] (id 'a'): tensor_parallel_size: "
            "Input should be greater than or equal to 1 (got 0)",
        ),
        (
            {"model_id": "a", "max_num_seqs": -4},
            "models[0] (id 'a'): max_num_seqs: Input should be greater than 0 (got -4)",
        ),
        (
            {"model_id": "a", "gpu_memory_gib": 0},
            "models[0] (id 'a'): gpu_memory_gib: Input should be greater than 0 (got 0)",
        ),
        (
            {"model_id": "a", "kv_cache_dtype": "int4"},
            "models[0] (id 'a'): kv_cache_dtype: Input should be 'auto', 'fp8'",
        ),
        (
            {"model_id": "a", "route_prefix": "qwen"},
            "models[0] (id 'a'): route_prefix: must start with '/' (got 'qwen')",
        ),
        (
            {"model_id": "a", "engine_kwargs": {"model": "x"}},
            "['model'] cannot be set: rackserve sets them from model_id",
        ),
        (
            {"model_id": "a", "engine_kwargs": {"max_model_len": 9}},
            "['max_model_len'] must be set as top-level fields",
        ),
        ({"model_id": " a"}, "model_id: must not be blank or have leading/trailing spaces"),
        ({"model_source": "org/x"}, "models[0]: model_id: is required"),
        ({"model_id": 7}, "models[0]: model_id: Input should be a valid string (got 7)"),
    ],
)
def test_field_errors_name_the_model_and_field(model: dict[str, object], expected: str) -> None:
    assert any(expected in p for p in problems(json.dumps([model]))), problems(json.dumps([model]))


def test_all_problems_are_reported_at_once() -> None:
    found = problems(
        json.dumps([{"model_id": "a", "tensor_parallel_size": -1}, {"model_id": "a"}, "x"])
    )
    assert len(found) == 3
    assert "models[1] (id 'a'): duplicate model_id (also models[0])" in found[1]
    assert "models[2]: expected a mapping of fields, got str" in found[2]


def test_registry_add_get_list_remove() -> None:
    registry = ModelManager()
    registry.add(ModelConfig(model_id="a"))
    registry.add(ModelConfig(model_id="b"))
    assert [m.model_id for m in registry.list()] == ["a", "b"]
    assert "a" in registry
    with pytest.raises(ConfigError, match="duplicate model_id 'a'"):
        registry.add(ModelConfig(model_id="a"))
    assert registry.remove("a").model_id == "a"
    assert len(registry) == 1
    with pytest.raises(ConfigError, match=r"no model 'a' \(known: b\)"):
        registry.get("a")
