"""Hostile and careless inputs through the installed `rackserve` command: one named case each.

Every case runs the real console script in a fresh process, in a directory of its own holding
a good cluster file, a good local model (config.json only) and the case's files. Each must end
with its documented exit code, a short message that names the problem, no traceback, no raw
control characters, and in bounded time. The cases run in parallel threads (one interpreter
start-up each), about 30 s in all on two cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.hf_data import HF_CONFIGS

pytestmark = pytest.mark.integration

RACKSERVE = Path(sys.executable).with_name("rackserve")
LLAMA = json.loads((HF_CONFIGS / "meta-llama--Llama-3.1-8B-Instruct.json").read_text())
MOE = json.loads((HF_CONFIGS / "Qwen--Qwen3-30B-A3B.json").read_text())
GOOD_CLUSTER = """\
nodes:
  - name: gpu-a
    gpus:
      - {index: 0, name: NVIDIA H100 80GB HBM3, memory_total_mib: 81559, memory_free_mib: 81000}
      - {index: 1, name: NVIDIA H100 80GB HBM3, memory_total_mib: 81559, memory_free_mib: 81000}
"""
MAX_MESSAGE = 8_000
MAX_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class Case:
    """One hostile input: the command line, the files it reads, and the answer it must get."""

    name: str
    args: tuple[str, ...]
    files: Mapping[str, str | bytes] = dataclasses.field(default_factory=dict)
    code: int = 2
    says: tuple[str, ...] = ()
    env: Mapping[str, str | bytes] = dataclasses.field(default_factory=dict)
    quiet_stdout: bool = False  # nothing printed before the error (checked before the work)
    seconds: float = MAX_SECONDS


def models_yaml(*entries: str) -> str:
    return "models:\n" + "".join(f"  - {entry}\n" for entry in entries)


def config(**changes: object) -> str:
    return json.dumps({**LLAMA, **changes})


def safetensors(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


E = ("estimate", "-m", "m.yaml")
P = ("plan", "-c", "cluster.yaml", "-m", "m.yaml")
GIVEN = "gpu_memory_gib: 4"
LOCAL = "{model_id: llama, model_source: ./llama, max_model_len: 8192}"
DEEP_YAML = "models:\n" + "".join("  " * i + "- \n" for i in range(2000))
LAUGHS = "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n"
    for i in range(9)
)
BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + LAUGHS


def llama_dir(**files: str | bytes) -> dict[str, str | bytes]:
    """A model directory `llama/` with a (changed) config.json and other files."""
    return {"llama/config.json": config(), **{f"llama/{k}": v for k, v in files.items()}}


CASES = [
    # Names are never read as Rich markup, and control characters are escaped.
    Case(
        "markup-close-tag-as-model-id",
        E,
        {"m.yaml": models_yaml(f'{{model_id: "[/oops]", {GIVEN}}}')},
        0,
        ("[/oops]",),
    ),
    Case(
        "markup-in-a-message",
        E,
        {
            "m.yaml": models_yaml(
                f'{{model_id: "[bold]x", {GIVEN}}}', f'{{model_id: "[bold]x", {GIVEN}}}'
            )
        },
        2,
        ("(id '[bold]x'): duplicate model_id",),
    ),
    Case(
        "markup-in-a-path",
        ("estimate", "-m", "[red]missing.yaml"),
        {},
        2,
        ("[red]missing.yaml", "No such file"),
    ),
    Case(
        "markup-in-plan-tables",
        P,
        {
            "m.yaml": models_yaml(f'{{model_id: "[bold]m", {GIVEN}, node: "[blue]n"}}'),
            "cluster.yaml": GOOD_CLUSTER.replace("gpu-a", '"[blue]n"'),
        },
        0,
        ("[bold]m", "[blue]n"),
    ),
    Case(
        "escape-sequence-in-model-id",
        E,
        {"m.yaml": models_yaml(f'{{model_id: "a\\e[2Jb", {GIVEN}}}')},
        2,
        ("must not contain control characters",),
    ),
    Case(
        "bidi-override-in-a-field-name",
        E,
        {"m.yaml": models_yaml('{model_id: a, "\\u202egpu": 1}')},
        2,
        ("unknown field '\\u202egpu'",),
    ),
    Case(
        "markup-as-unknown-field",
        E,
        {"m.yaml": models_yaml('{model_id: a, "[x]": 1}')},
        2,
        ("unknown field '[x]'",),
    ),
    Case(
        "newline-in-node-name",
        P,
        {
            "m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}"),
            "cluster.yaml": GOOD_CLUSTER.replace("gpu-a", '"a\\nb"'),
        },
        2,
        ("must not contain control characters",),
    ),
    # Input that is not UTF-8.
    Case("random-bytes-models-file", E, {"m.yaml": bytes(range(256)) * 4}, 2, ("not UTF-8",)),
    Case(
        "utf16-yaml",
        E,
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}").encode("utf-16")},
        2,
        ("UTF-16",),
    ),
    Case(
        "latin1-yaml",
        E,
        {"m.yaml": models_yaml(f"{{model_id: café, {GIVEN}}}").encode("latin-1")},
        2,
        ("not UTF-8 text (byte 0xe9",),
    ),
    Case(
        "utf8-byte-order-mark-is-fine",
        E,
        {"m.yaml": b"\xef\xbb\xbf" + models_yaml(f"{{model_id: a, {GIVEN}}}").encode()},
        0,
    ),
    Case(
        "models-config-env-not-utf8",
        ("estimate",),
        {},
        2,
        ("MODELS_CONFIG", "not UTF-8"),
        env={"MODELS_CONFIG": b'[{"model_id": "\xff\xfe"}]'},
    ),
    Case(
        "model-id-env-not-utf8",
        ("estimate",),
        {},
        2,
        ("MODEL_ID", "not UTF-8"),
        env={"MODEL_ID": b"\xc3\x28"},
    ),
    Case(
        "cluster-file-not-utf8",
        P,
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}"), "cluster.yaml": b"nodes: [\xff]"},
        2,
        ("--cluster", "not UTF-8"),
    ),
    Case(
        "nul-byte-in-file",
        E,
        {"m.yaml": b"models:\x00"},
        2,
        ("control characters are not allowed",),
    ),
    Case(
        "config-json-not-utf8",
        E,
        {"m.yaml": models_yaml(LOCAL), **llama_dir(**{"config.json": b'{"a": "\xff"}'})},
        2,
        ("config.json", "not UTF-8"),
    ),
    # Deep nesting.
    Case(
        "json-of-100000-brackets", E, {"m.yaml": "[" * 100_000}, 2, ("nested more than 32 levels",)
    ),
    Case("yaml-of-2000-levels", E, {"m.yaml": DEEP_YAML}, 2, ("nested more than 32 levels",)),
    Case(
        "deep-models-config-env",
        ("estimate",),
        {},
        2,
        ("MODELS_CONFIG", "nested more than 32"),
        env={"MODELS_CONFIG": "[" * 50_000 + "]" * 50_000},
    ),
    Case(
        "deep-cluster-file",
        P,
        {
            "m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}"),
            "cluster.yaml": "nodes: " + "[" * 5000,
        },
        2,
        ("--cluster", "nested more than 32"),
    ),
    Case(
        "deep-config-json",
        E,
        {
            "m.yaml": models_yaml(LOCAL),
            **llama_dir(**{"config.json": '{"a": ' + "[" * 40 + "]" * 40 + "}"}),
        },
        2,
        ("nested more than 32",),
    ),
    Case(
        "deep-engine-kwargs",
        E,
        {
            "m.yaml": models_yaml(
                f"{{model_id: a, {GIVEN}, engine_kwargs: {{x: " + "[" * 40 + "]" * 40 + "}}"
            )
        },
        2,
        ("nested more than 32",),
    ),
    # Non-finite, huge and wrongly typed numbers.
    Case(
        "gpu-memory-inf",
        E,
        {"m.yaml": models_yaml("{model_id: a, gpu_memory_gib: .inf}")},
        2,
        ("models[0].gpu_memory_gib' is not finite",),
    ),
    Case(
        "gpu-memory-1e308",
        E,
        {"m.yaml": models_yaml("{model_id: a, gpu_memory_gib: 1e308}")},
        2,
        ("gpu_memory_gib: Input should be less than or equal to 65536",),
    ),
    Case(
        "overhead-infinity-json",
        E,
        {"m.yaml": '[{"model_id": "a", "gpu_memory_gib": 1, "overhead_gib": Infinity}]'},
        2,
        ("not finite",),
    ),
    Case(
        "gpu-memory-1e400-json",
        E,
        {"m.yaml": '[{"model_id": "a", "gpu_memory_gib": 1e400}]'},
        2,
        ("not finite",),
    ),
    Case(
        "gpu-memory-nan",
        E,
        {"m.yaml": models_yaml("{model_id: a, gpu_memory_gib: .nan}")},
        2,
        ("not finite",),
    ),
    Case(
        "reserve-gib-nan",
        (*P, "--reserve-gib", "nan"),
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}")},
        2,
        ("--reserve-gib",),
        quiet_stdout=True,
    ),
    Case(
        "reserve-gib-inf",
        (*P, "--reserve-gib", "inf"),
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}")},
        2,
        ("--reserve-gib",),
        quiet_stdout=True,
    ),
    Case(
        "reserve-gib-negative",
        (*P, "--reserve-gib", "-1"),
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}")},
        2,
        ("--reserve-gib",),
        quiet_stdout=True,
    ),
    Case(
        "tensor-parallel-1e30",
        E,
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}, tensor_parallel_size: {10**29}}}")},
        2,
        ("tensor_parallel_size: Input should be less than or equal to 64",),
    ),
    Case(
        "integer-of-5000-digits-yaml",
        E,
        {"m.yaml": models_yaml(f"{{model_id: a, max_num_seqs: {'9' * 5000}}}")},
        2,
        ("more than 30 digits",),
    ),
    Case(
        "integer-of-5000-digits-json",
        E,
        {"m.yaml": f'[{{"model_id": "a", "max_num_seqs": {"9" * 5000}}}]'},
        2,
        ("more than 30 digits",),
    ),
    Case(
        "gpu-of-1e29-mib",
        P,
        {
            "m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}"),
            "cluster.yaml": "nodes: [{name: n, gpus: [{index: 0, memory_total_mib: "
            f"{10**29}, memory_free_mib: 1}}]}}]",
        },
        2,
        ("memory_total_mib: Input should be less than or equal to",),
    ),
    Case(
        "cluster-number-as-string",
        P,
        {
            "m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}"),
            "cluster.yaml": GOOD_CLUSTER.replace(
                "memory_total_mib: 81559", 'memory_total_mib: "81559"'
            ),
        },
        2,
        ("memory_total_mib: Input should be a valid integer (got '81559')",),
    ),
    Case(
        "negative-overhead",
        E,
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}, overhead_gib: -1}}")},
        2,
        ("overhead_gib: Input should be greater than or equal to 0",),
    ),
    Case(
        "boolean-as-gib",
        E,
        {"m.yaml": models_yaml("{model_id: a, gpu_memory_gib: true}")},
        2,
        ("gpu_memory_gib: Input should be a valid number",),
    ),
    Case(
        "max-model-len-env-huge",
        ("estimate",),
        {},
        2,
        ("MAX_MODEL_LEN must be a positive integer",),
        env={"MODEL_ID": "a", "MAX_MODEL_LEN": "9" * 40},
    ),
    Case(
        "tensor-parallel-env-word",
        ("estimate",),
        {},
        2,
        ("TENSOR_PARALLEL_SIZE must be a positive integer (got 'four')",),
        env={"MODEL_ID": "a", "TENSOR_PARALLEL_SIZE": "four"},
    ),
    Case(
        "yaml-1-2-float-is-a-number",
        (*E, "--json", "-"),
        {"m.yaml": models_yaml("{model_id: a, gpu_memory_gib: 4.0e1}")},
        0,
        ('"total_gib_per_gpu": 40.0',),
    ),
    Case(
        "http-port-out-of-range",
        ("deploy", "-m", "m.yaml", "--http-port", "99999"),
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}")},
        2,
        ("--http-port",),
        quiet_stdout=True,
    ),
    Case(
        "ssl-certfile-without-its-key",
        ("deploy", "-m", "m.yaml", "--ssl-certfile", "cert.pem"),
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}"), "cert.pem": "x"},
        2,
        ("--ssl-certfile needs --ssl-keyfile too",),
        quiet_stdout=True,
    ),
    Case(
        "ssl-files-that-are-not-pem",
        ("deploy", "-m", "m.yaml", "--ssl-certfile", "cert.pem", "--ssl-keyfile", "key.pem"),
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}"), "cert.pem": "x", "key.pem": "y"},
        2,
        ("do not load", "give a PEM certificate"),
        quiet_stdout=True,
    ),
    Case(
        "api-keys-and-no-auth",
        ("deploy", "-m", "m.yaml", "--api-keys", "keys.json", "--no-auth"),
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}"), "keys.json": '{"keys": []}'},
        2,
        ("--api-keys and --no-auth contradict each other",),
        quiet_stdout=True,
    ),
    Case(
        "deploy-without-keys-or-no-auth",
        ("deploy", "-m", "m.yaml", "--address", "127.0.0.1:9"),
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}")},
        2,
        ("no API keys:", "nothing was deployed", "pass --no-auth to serve without keys on purpose"),
        quiet_stdout=True,
    ),
    Case(
        "api-key-file-readable-by-others",
        ("deploy", "-m", "m.yaml", "--api-keys", "keys.json"),
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}"), "keys.json": '{"keys": []}'},
        2,
        ("others may read it; run `chmod 600",),
        quiet_stdout=True,
    ),
    # Paths and ids.
    Case(
        "model-id-of-3000-characters",
        ("estimate",),
        {},
        2,
        ("model_id: String should have at most 256 characters",),
        env={"MODEL_ID": "a" * 3000},
    ),
    Case(
        "model-source-of-5000-characters",
        E,
        {"m.yaml": models_yaml(f"{{model_id: a, model_source: {'b' * 5000}}}")},
        2,
        ("model_source: String should have at most 4096 characters",),
    ),
    Case(
        "model-source-name-too-long",
        E,
        {"m.yaml": models_yaml(f"{{model_id: a, model_source: ./{'b' * 3000}}}")},
        2,
        ("File name too long",),
    ),
    Case(
        "model-id-of-no-such-user",
        ("estimate",),
        {},
        2,
        ("'~nosuchuser': no such user's home directory",),
        env={"MODEL_ID": "~nosuchuser"},
    ),
    Case(
        "empty-model-source",
        E,
        {"m.yaml": models_yaml("{model_id: a, model_source: ''}")},
        2,
        ("model_source: String should have at least 1 character",),
    ),
    Case(
        "nul-in-model-source",
        E,
        {"m.yaml": models_yaml('{model_id: a, model_source: "x\\0y"}')},
        2,
        ("must not contain control characters",),
    ),
    Case(
        "invalid-hub-repo-id",
        E,
        {"m.yaml": models_yaml("{model_id: a, model_source: 'org/x y'}")},
        2,
        ("nor a valid Hugging Face repo id",),
    ),
    Case(
        "relative-source-from-another-directory",
        ("estimate", "-m", "sub/m.yaml", "--json", "-"),
        {
            "sub/m.yaml": models_yaml(
                "{model_id: llama, model_source: llama, max_model_len: 8192}"
            ),
            "sub/llama/config.json": config(),
        },
        0,
        ('"weights_from": "parameter count"',),
    ),
    Case(
        "relative-dot-source-missing",
        E,
        {"m.yaml": models_yaml("{model_id: a, model_source: ./nowhere}")},
        2,
        ("nowhere' is not a directory",),
    ),
    Case(
        "models-option-is-a-directory",
        ("estimate", "-m", "llama"),
        llama_dir(),
        2,
        ("is a directory",),
    ),
    Case(
        "models-file-missing",
        ("estimate", "-m", "missing.yaml"),
        {},
        2,
        ("--models missing.yaml: it cannot be read: No such file",),
    ),
    Case(
        "models-file-is-dev-zero", ("estimate", "-m", "/dev/zero"), {}, 2, ("not a regular file",)
    ),
    Case(
        "models-file-of-9-mib",
        E,
        {"m.yaml": "# " + "x" * (9 * 1024 * 1024)},
        2,
        ("larger than the limit of 8,388,608 bytes",),
    ),
    # Hostile config.json and checkpoint files.
    Case(
        "rope-factor-infinity",
        E,
        {
            "m.yaml": models_yaml(LOCAL),
            **llama_dir(
                **{
                    "config.json": config(
                        rope_scaling={"rope_type": "yarn", "factor": float("inf")}
                    )
                }
            ),
        },
        2,
        ("rope_scaling.factor is inf",),
    ),
    Case(
        "negative-layer-count",
        E,
        {
            "m.yaml": models_yaml(LOCAL),
            **llama_dir(**{"config.json": config(num_hidden_layers=-80)}),
        },
        2,
        ("num_hidden_layers is -80",),
    ),
    Case(
        "ten-billion-moe-layers",
        E,
        {
            "m.yaml": models_yaml(LOCAL),
            **llama_dir(**{"config.json": json.dumps({**MOE, "num_hidden_layers": 10**10})}),
        },
        2,
        ("num_hidden_layers is 10000000000",),
        seconds=15,
    ),
    Case(
        "three-byte-safetensors",
        E,
        {"m.yaml": models_yaml(LOCAL), **llama_dir(**{"model.safetensors": b"abc"})},
        2,
        ("too short for a safetensors file",),
    ),
    Case(
        "index-metadata-is-a-list",
        E,
        {
            "m.yaml": models_yaml(LOCAL),
            **llama_dir(**{"model.safetensors.index.json": '{"metadata": [1]}'}),
        },
        2,
        ("metadata is not a mapping",),
    ),
    Case(
        "index-total-size-negative",
        E,
        {
            "m.yaml": models_yaml(LOCAL),
            **llama_dir(**{"model.safetensors.index.json": '{"metadata": {"total_size": -5}}'}),
        },
        2,
        ("metadata.total_size is -5",),
    ),
    Case(
        "reversed-data-offsets",
        E,
        {
            "m.yaml": models_yaml(LOCAL),
            **llama_dir(
                **{
                    "model.safetensors": safetensors(
                        b'{"w": {"dtype": "BF16", "shape": [1], '
                        b'"data_offsets": [1000000000000000, 0]}}'
                    )
                }
            ),
        },
        2,
        ("data_offsets",),
    ),
    Case(
        "safetensors-header-too-long",
        E,
        {
            "m.yaml": models_yaml(LOCAL),
            **llama_dir(**{"model.safetensors": struct.pack("<Q", 2**60) + b"{}"}),
        },
        2,
        ("is not plausible",),
    ),
    Case(
        "safetensors-header-not-json",
        E,
        {"m.yaml": models_yaml(LOCAL), **llama_dir(**{"model.safetensors": safetensors(b"{nope")})},
        2,
        ("safetensors header: not valid JSON",),
    ),
    Case(
        "config-json-is-a-list",
        E,
        {"m.yaml": models_yaml(LOCAL), **llama_dir(**{"config.json": "[1, 2]"})},
        2,
        ("is not a JSON object",),
    ),
    Case(
        "config-json-duplicate-keys",
        E,
        {
            "m.yaml": models_yaml(LOCAL),
            **llama_dir(**{"config.json": '{"num_hidden_layers": 32, "num_hidden_layers": 2}'}),
        },
        2,
        ("duplicate key 'num_hidden_layers'",),
    ),
    Case(
        "config-json-mlp-only-layers-nested",
        E,
        {
            "m.yaml": models_yaml(LOCAL),
            **llama_dir(**{"config.json": json.dumps({**MOE, "mlp_only_layers": [[1]]})}),
        },
        2,
        ("mlp_only_layers is not a list of integers",),
    ),
    Case(
        "config-json-quant-bits-huge",
        E,
        {
            "m.yaml": models_yaml(LOCAL),
            **llama_dir(
                **{"config.json": config(quantization_config={"quant_method": "gptq", "bits": 1e9})}
            ),
        },
        2,
        ("bits is 1000000000.0, not 1 to 64",),
    ),
    Case(
        "config-json-without-heads",
        E,
        {
            "m.yaml": models_yaml(LOCAL),
            **llama_dir(
                **{
                    "config.json": json.dumps(
                        {k: v for k, v in LLAMA.items() if k != "num_attention_heads"}
                    )
                }
            ),
        },
        2,
        ("no integer num_attention_heads",),
    ),
    # Output targets are checked before any work.
    Case(
        "json-into-missing-directory",
        (*E, "--json", "/nonexistent/dir/p.json"),
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}")},
        2,
        ("--json", "does not exist"),
        quiet_stdout=True,
    ),
    Case(
        "json-onto-a-directory",
        (*E, "--json", "llama"),
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}"), **llama_dir()},
        2,
        ("llama is a directory",),
        quiet_stdout=True,
    ),
    Case(
        "json-empty-name",
        (*E, "--json", ""),
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}")},
        2,
        ("needs a file name",),
        quiet_stdout=True,
    ),
    Case(
        "json-read-only-target",
        (*E, "--json", "/proc/version"),
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}")},
        2,
        ("cannot write /proc/version",),
        quiet_stdout=True,
    ),
    Case(
        "json-where-files-cannot-be-made",
        (*P, "--json", "/proc/plan.json"),
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}")},
        2,
        ("cannot write /proc/plan.json",),
        quiet_stdout=True,
    ),
    # YAML aliases: allowed, but their expansion is bounded.
    Case(
        "billion-laughs",
        E,
        {"m.yaml": BOMB + "models: [{model_id: a, gpu_memory_gib: 1}]\n"},
        2,
        ("more than 200,000 values",),
        seconds=15,
    ),
    Case(
        "billion-laughs-in-a-field",
        E,
        {"m.yaml": BOMB + "models: [{model_id: *j}]\n"},
        2,
        ("more than 200,000 values",),
        seconds=15,
    ),
    Case(
        "recursive-alias",
        E,
        {"m.yaml": "models: &m [{model_id: a, engine_kwargs: {x: *m}}]\n"},
        2,
        ("refers to a value that contains it",),
    ),
    Case(
        "alias-for-repeated-gpus-is-fine",
        P,
        {
            "m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}"),
            "cluster.yaml": GOOD_CLUSTER
            + "  - name: gpu-b\n"
            + "    gpus: &g [{index: 0, memory_total_mib: 100, memory_free_mib: 90}]\n"
            + "  - name: gpu-c\n    gpus: *g\n",
        },
        0,
    ),
    # Duplicate keys are refused, never last-wins.
    Case(
        "duplicate-keys-json",
        E,
        {"m.yaml": '[{"model_id": "a", "model_id": "b", "gpu_memory_gib": 1}]'},
        2,
        ("duplicate key 'model_id'",),
    ),
    Case(
        "duplicate-keys-yaml",
        E,
        {"m.yaml": "models:\n  - model_id: a\n    gpu_memory_gib: 1\n    gpu_memory_gib: 90\n"},
        2,
        ("duplicate key 'gpu_memory_gib' at line 4",),
    ),
    Case(
        "duplicate-keys-cluster",
        P,
        {
            "m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}"),
            "cluster.yaml": "nodes: []\nnodes: []\n",
        },
        2,
        ("--cluster", "duplicate key 'nodes'"),
    ),
    Case(
        "duplicate-model-ids",
        E,
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}}}", f"{{model_id: a, {GIVEN}}}")},
        2,
        ("duplicate model_id (also models[0])",),
    ),
    # route_prefix is one setting of the application.
    Case(
        "different-route-prefixes",
        P,
        {
            "m.yaml": models_yaml(
                f"{{model_id: a, {GIVEN}, route_prefix: /a}}",
                f"{{model_id: b, {GIVEN}, route_prefix: /b}}",
            )
        },
        2,
        ("route_prefix: the models ask for different values",),
    ),
    Case(
        "deploy-refuses-what-plan-refuses",
        ("deploy", "-m", "m.yaml", "--address", "127.0.0.1:9", "--no-auth"),
        {
            "m.yaml": models_yaml(
                f"{{model_id: a, {GIVEN}, route_prefix: /a}}",
                f"{{model_id: b, {GIVEN}, route_prefix: /b}}",
            )
        },
        2,
        ("route_prefix: the models ask for different values",),
        quiet_stdout=True,
    ),
    Case(
        "route-prefix-without-slash",
        E,
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}, route_prefix: noslash}}")},
        2,
        ("route_prefix: must start with '/' (got 'noslash')",),
    ),
    Case(
        "route-prefix-trailing-slash",
        E,
        {"m.yaml": models_yaml(f"{{model_id: a, {GIVEN}, route_prefix: /a/}}")},
        2,
        ("must not end with '/'",),
    ),
    Case(
        "one-route-prefix-shared",
        P,
        {
            "m.yaml": models_yaml(
                f"{{model_id: a, {GIVEN}, route_prefix: /v}}",
                f"{{model_id: b, {GIVEN}, route_prefix: /v}}",
            )
        },
        0,
    ),
    # The hub, unreachable: one attempt, then what to do.
    Case(
        "hub-unreachable",
        E,
        {"m.yaml": models_yaml("{model_id: q, model_source: Qwen/Qwen2.5-0.5B}")},
        2,
        ("HF_HUB_OFFLINE", "HF_ENDPOINT", "gpu_memory_gib", "could not be reached"),
        env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"},
        seconds=15,
    ),
    Case(
        "hub-offline-not-cached",
        E,
        {"m.yaml": models_yaml("{model_id: q, model_source: Qwen/Qwen2.5-0.5B}")},
        2,
        ("not in the local Hugging Face cache while HF_HUB_OFFLINE is set",),
    ),
    # Documents of the wrong shape.
    Case("empty-file", E, {"m.yaml": ""}, 2, ("it is empty",)),
    Case(
        "only-a-comment",
        E,
        {"m.yaml": "# nothing\n"},
        2,
        ("expected a list of models, got NoneType",),
    ),
    Case(
        "python-tag",
        E,
        {"m.yaml": "models: !!python/object/apply:os.system [true]\n"},
        2,
        ("could not determine a constructor",),
    ),
    Case("two-documents", E, {"m.yaml": "models: []\n---\nmodels: []\n"}, 2, ("not valid YAML",)),
    Case(
        "too-many-models",
        E,
        {"m.yaml": "models:\n" + f"  - {{{GIVEN}}}\n" * 1001},
        2,
        ("1001 models; the limit is 1000",),
    ),
    Case(
        "thousand-bad-models-short-message",
        E,
        {"m.yaml": "models:\n" + "  - {tensor_parallel_size: 0}\n" * 1000},
        2,
        ("... and 1980 more problems",),
    ),
    Case(
        "list-as-a-key",
        E,
        {"m.yaml": "models:\n  - ? [a]\n    : b\n"},
        2,
        ("a key is a list or mapping",),
    ),
    Case(
        "yaml-boolean-as-model-id",
        E,
        {"m.yaml": models_yaml(f"{{model_id: no, {GIVEN}}}")},
        2,
        ("model_id: Input should be a valid string (got False)",),
    ),
    Case("top-level-scalar", E, {"m.yaml": "42\n"}, 2, ("expected a list of models, got int",)),
]


@pytest.fixture(scope="module")
def results(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[subprocess.CompletedProcess[bytes], float]]:
    """Every case run once, in parallel, each in a directory of its own."""
    assert RACKSERVE.exists(), f"{RACKSERVE} is not installed (pip install -e .)"
    base = tmp_path_factory.mktemp("hostile")
    environ = {k: v for k, v in os.environ.items() if k not in {"MODELS_CONFIG", "MODEL_ID"}}
    environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(base / "hf"), COLUMNS="200")

    def run(case: Case) -> tuple[str, tuple[subprocess.CompletedProcess[bytes], float]]:
        directory = base / case.name
        directory.mkdir()
        (directory / "cluster.yaml").write_text(GOOD_CLUSTER)
        for name, content in case.files.items():
            path = directory / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        env: dict[str, str | bytes] = {**environ, **case.env}
        env = {k: v for k, v in env.items() if v != ""}
        started = time.monotonic()
        result = subprocess.run(
            [str(RACKSERVE), *case.args],
            cwd=directory,
            env=env,  # type: ignore[arg-type]  # bytes values are passed as they are
            capture_output=True,
            timeout=120,
            check=False,
        )
        return case.name, (result, time.monotonic() - started)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, CASES))


def test_there_are_at_least_60_named_cases() -> None:
    names = [case.name for case in CASES]
    assert len(set(names)) == len(names) >= 60


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_input_gets_its_answer(
    case: Case, results: dict[str, tuple[subprocess.CompletedProcess[bytes], float]]
) -> None:
    result, elapsed = results[case.name]
    out = result.stdout.decode("utf-8", "replace")
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == case.code, f"exit {result.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len(err) < MAX_MESSAGE, f"a message of {len(err)} characters"
    assert "\x1b" not in out + err, "a raw escape character reached the terminal"
    for text in case.says:
        assert text in out + err, f"{text!r} not in:\n{err[-3000:]}"
    if case.code == 2:
        assert err.startswith(("error: ", "Usage: ")), err[:500]
    if case.quiet_stdout:
        assert not out.strip(), f"work was done before the error:\n{out[:500]}"
    assert elapsed < case.seconds, f"took {elapsed:.1f} s"
