"""Fuzzing the input boundary: every document gets an answer, never a traceback or a hang.

Hypothesis builds hostile models files, cluster files, `MODELS_CONFIG` values, config.json
files and safetensors headers (random bytes, deep nesting, huge and non-finite numbers, markup
and control characters, wrong types, YAML aliases) and runs each through the real command line
entry point, `deployer.cli.app.main`, in this process. Each run must exit 0, 2 or 3, let no
exception escape, finish in bounded time and print a bounded message. About a minute in all.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployer.cli.app import main
from deployer.config.models_config import ModelConfig
from tests.hf_data import hf_config

pytestmark = pytest.mark.unit

EXAMPLES = int(os.environ.get("RACKSERVE_FUZZ_EXAMPLES", "120"))  # more for a deeper search
MAX_SECONDS = 10.0
MAX_MESSAGE = 20_000
CLUSTER = (
    "nodes:\n  - name: gpu-a\n    gpus:\n"
    "      - {index: 0, name: H100, memory_total_mib: 81559, memory_free_mib: 81000}\n"
)
MODELS = "models: [{model_id: a, gpu_memory_gib: 4}]\n"
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

MODEL_FIELDS = list(ModelConfig.model_fields)
CLUSTER_FIELDS = [
    "nodes",
    "name",
    "gpus",
    "index",
    "memory_total_mib",
    "memory_free_mib",
    "memory_used_mib",
    "cpu_memory_mib",
    "labels",
    "ip",
]
CONFIG_FIELDS = [
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "intermediate_size",
    "max_position_embeddings",
    "num_experts",
    "num_local_experts",
    "moe_intermediate_size",
    "first_k_dense_replace",
    "moe_layer_freq",
    "decoder_sparse_step",
    "mlp_only_layers",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "rope_scaling",
    "quantization_config",
    "text_config",
    "tie_word_embeddings",
    "torch_dtype",
    "model_type",
]

hostile_strings = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "[/oops]",
            "[bold]x",
            "[link=file:///etc/passwd]x[/link]",
            "\x1b[2J",
            "\u202egpu",
            "a\nb",
            "~nosuchuser",
            "./nowhere",
            "/",
            "org/repo",
            "x" * 5000,
            "\udcff",
            "",
            " ",
            "/route",
        ]
    ),
)
numbers = st.one_of(
    st.integers(min_value=-5, max_value=100_000),
    st.integers(),
    st.sampled_from([10**30, -(10**30), 10**400, 2**63, 2**64]),
    st.floats(),
    st.floats(min_value=0.01, max_value=200),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, hostile_strings)


def values(keys: list[str]) -> st.SearchStrategy[Any]:
    """Nested hostile values whose mapping keys are mostly the schema's own field names."""
    key = st.one_of(st.sampled_from(keys), hostile_strings)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(key, inner, max_size=5),
        max_leaves=15,
    )


names = st.one_of(st.from_regex(r"[a-z][a-z0-9.-]{0,8}", fullmatch=True), hostile_strings)
sizes = st.one_of(st.sampled_from([1, 2, 4, 8]), numbers)
# Values that pass the schema, mixed with hostile ones, so that the checks behind parsing run.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "model_id": names,
    "name": names,
    "node": st.sampled_from(["gpu-a", "cpu", "[x]"]),
    "gpu_memory_gib": st.floats(min_value=0.01, max_value=200),
    "overhead_gib": st.floats(min_value=0, max_value=20),
    "tensor_parallel_size": sizes,
    "max_model_len": st.integers(min_value=1, max_value=2**20),
    "max_num_seqs": sizes,
    "route_prefix": st.sampled_from(["/", "/a", "/b", "a", "/a/"]),
    "index": st.integers(min_value=0, max_value=9),
    "memory_total_mib": st.integers(min_value=1, max_value=2**20),
    "memory_free_mib": st.integers(min_value=0, max_value=2**20),
    "cpu_memory_mib": st.integers(min_value=0, max_value=2**20),
}


def entries(keys: list[str], nested: str | None = None) -> st.SearchStrategy[dict[str, Any]]:
    """A mapping of schema fields: all plausible, or each plausible or hostile.

    `nested` names the field that holds a list of such mappings (a node's gpus).
    """
    others = [k for k in keys if k != nested]
    plausible = {key: PLAUSIBLE[key] for key in others if key in PLAUSIBLE}
    mixed = {key: st.one_of(PLAUSIBLE.get(key, values(keys)), values(keys)) for key in others}
    if nested is not None:
        plausible[nested] = st.lists(entries(others), max_size=3)
        mixed[nested] = plausible[nested]
    return st.one_of(
        st.fixed_dictionaries({}, optional=plausible), st.fixed_dictionaries({}, optional=mixed)
    )


def documents(keys: list[str], top: str, nested: str | None = None) -> st.SearchStrategy[Any]:
    """Mostly schema-shaped documents (so the checks behind parsing are reached), some not."""
    entry = entries([k for k in keys if k != top], nested)
    if top == "models":  # a model needs its id and, without config.json, its footprint
        entry = st.builds(
            lambda e, i, g: {"model_id": i, "gpu_memory_gib": g, **e}, entry, names, sizes
        )
    shaped = st.fixed_dictionaries({top: st.lists(entry, min_size=1, max_size=3)})
    return st.one_of(shaped, st.lists(entry, max_size=3), values(keys))


def dump(document: object, style: str) -> bytes:
    """The document as JSON or YAML bytes (YAML with anchors and aliases for shared values)."""
    if style == "yaml":
        try:
            return yaml.safe_dump(document).encode("utf-8", "surrogateescape")
        except (yaml.YAMLError, UnicodeError):
            pass
    return json.dumps(document).encode()


def nesting(depth: int, style: str) -> bytes:
    if style == "json":
        return ("[" * depth + "]" * depth).encode()
    return ("models:\n" + "".join("  " * i + "- \n" for i in range(depth))).encode()


def alias_bomb(width: int, levels: int) -> bytes:
    """A model whose engine_kwargs hold `levels` anchors, each `width` aliases of the last."""
    anchors = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for level in range(1, levels):
        anchors.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    kwargs = ", ".join(anchors)
    return f"models: [{{model_id: a, gpu_memory_gib: 1, engine_kwargs: {{{kwargs}}}}}]\n".encode()


def hostile_files(keys: list[str], top: str, nested: str | None = None) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(dump, documents(keys, top, nested), st.sampled_from(["json", "yaml"])),
        st.binary(max_size=300),
        st.builds(
            nesting, st.integers(min_value=30, max_value=3000), st.sampled_from(["json", "yaml"])
        ),
        st.builds(alias_bomb, st.integers(min_value=2, max_value=12), st.integers(2, 9)),
        st.text(max_size=200).map(lambda t: t.encode("utf-16")),
    )


@contextlib.contextmanager
def environment(**changes: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def answer(argv: list[str]) -> tuple[int, str]:
    """Run the command line in-process: its exit code and what it printed on stderr."""
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = 0 if exit_.code is None else int(exit_.code)
    elapsed = time.monotonic() - started
    message = err.getvalue()
    assert code in {0, 2, 3}, f"exit {code}: {message[-2000:]}"
    assert elapsed < MAX_SECONDS, f"took {elapsed:.1f} s"
    assert len(message) < MAX_MESSAGE, f"a message of {len(message)} characters"
    assert "Traceback" not in message
    return code, message


@pytest.fixture(autouse=True)
def _no_models_from_the_environment(offline_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELS_CONFIG", raising=False)
    monkeypatch.delenv("MODEL_ID", raising=False)


@FUZZ
@given(models=hostile_files(MODEL_FIELDS, "models"), command=st.sampled_from(["estimate", "plan"]))
def test_models_files(models: bytes, command: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "m.yaml").write_bytes(models)
        (Path(tmp) / "c.yaml").write_text(CLUSTER)
        argv = [command, "-m", f"{tmp}/m.yaml"]
        answer([*argv, "-c", f"{tmp}/c.yaml"] if command == "plan" else argv)


@FUZZ
@given(
    cluster=hostile_files(CLUSTER_FIELDS, "nodes", "gpus"),
    reserve=st.sampled_from(["1", "0", "nan", "inf", "-1", "1e999", "1e300"]),
)
def test_cluster_files(cluster: bytes, reserve: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "m.yaml").write_text(MODELS)
        (Path(tmp) / "c.yaml").write_bytes(cluster)
        answer(["plan", "-c", f"{tmp}/c.yaml", "-m", f"{tmp}/m.yaml", "--reserve-gib", reserve])


@FUZZ
@given(document=documents(MODEL_FIELDS, "models"))
def test_models_config_environment(document: object) -> None:
    text = json.dumps(document)
    with environment(MODELS_CONFIG=text.encode().decode("utf-8", "surrogateescape")):
        answer(["estimate", "--json", "-"])


def safetensors(header: object, data: int) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data


config_changes = st.dictionaries(st.sampled_from(CONFIG_FIELDS), values(CONFIG_FIELDS), max_size=5)
tensor_headers = st.dictionaries(
    hostile_strings,
    st.one_of(
        values(["dtype", "data_offsets", "shape"]),
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["BF16", "F32", "I8", "??"]),
                "data_offsets": st.lists(numbers, min_size=2, max_size=2),
            }
        ),
    ),
    max_size=3,
)


@FUZZ
@given(
    changes=config_changes,
    replace=st.booleans(),
    shard=st.one_of(
        st.none(),
        st.binary(max_size=40),
        st.builds(safetensors, tensor_headers, st.integers(0, 64)),
    ),
    index=st.one_of(st.none(), values(["metadata", "total_size", "weight_map"])),
)
def test_config_json_and_checkpoint_files(
    changes: dict[str, Any], replace: bool, shard: bytes | None, index: object
) -> None:
    base = {} if replace else hf_config("Qwen/Qwen3-30B-A3B")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({**base, **changes}))
        if shard is not None:
            (model / "model.safetensors").write_bytes(shard)
        if index is not None:
            (model / "model.safetensors.index.json").write_text(json.dumps(index))
        (Path(tmp) / "m.yaml").write_text(
            "models: [{model_id: m, model_source: ./model, max_model_len: 4096}]\n"
        )
        (Path(tmp) / "c.yaml").write_text(CLUSTER)
        answer(["plan", "-c", f"{tmp}/c.yaml", "-m", f"{tmp}/m.yaml"])
