"""The `rackserve` command line: outputs, JSON files and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deployer.cli.app import main
from tests.hf_data import HF_CONFIGS

pytestmark = pytest.mark.unit

CLUSTER = """
nodes:
  - name: gpu-a
    gpus:
      - {index: 0, name: NVIDIA H100 80GB HBM3, memory_total_mib: 81559, memory_free_mib: 81000}
      - {index: 1, name: NVIDIA H100 80GB HBM3, memory_total_mib: 81559, memory_free_mib: 81000}
  - name: gpu-b
    gpus:
      - {index: 0, name: NVIDIA H100 80GB HBM3, memory_total_mib: 81559, memory_free_mib: 81000}
"""


def local_model(tmp_path: Path, repo: str) -> str:
    """A local model directory holding only the published config.json."""
    directory = tmp_path / repo.replace("/", "--")
    directory.mkdir()
    (directory / "config.json").write_text(
        (HF_CONFIGS / f"{repo.replace('/', '--')}.json").read_text()
    )
    return str(directory)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    models = tmp_path / "models.yaml"
    models.write_text(
        textwrap.dedent(
            f"""\
            models:
              - model_id: llama-70b
                model_source: {local_model(tmp_path, "meta-llama/Llama-3.1-70B-Instruct")}
                tensor_parallel_size: 2
                max_model_len: 8192
              - model_id: llama-8b
                model_source: {local_model(tmp_path, "meta-llama/Llama-3.1-8B-Instruct")}
                max_model_len: 8192
                max_num_seqs: 16
              - model_id: small
                gpu_memory_gib: 20
            """
        )
    )
    return {"cluster": cluster, "models": models, "out": tmp_path / "out.json"}


def run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    return 0 if code is None else int(code)


def test_plan_prints_tables_and_writes_json(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(
        [
            "plan",
            "--cluster",
            str(files["cluster"]),
            "--models",
            str(files["models"]),
            "--json",
            str(files["out"]),
        ]
    )
    assert code == 0
    output = capsys.readouterr().out
    assert "Plan (launch order)" in output
    assert "GPU fill" in output
    assert "llama-70b" in output
    plan = json.loads(files["out"].read_text())
    by_id = {p["model_id"]: p for p in plan["placements"]}
    assert by_id["llama-70b"]["node"] == "gpu-a"
    assert by_id["llama-70b"]["gpus"] == [0, 1]
    assert by_id["llama-70b"]["gpu_fraction"] == 1.0
    # the two small models share the one GPU of gpu-b
    assert by_id["llama-8b"]["node"] == by_id["small"]["node"] == "gpu-b"
    assert set(by_id["llama-8b"]) >= {
        "model_id",
        "node",
        "gpus",
        "gpu_memory_gib",
        "gpu_fraction",
        "gpu_memory_utilization",
    }
    assert plan["unplaced"] == []
    assert plan["summary"]["models_placed"] == 3
    assert plan["summary"]["gpus_used"] == 3
    assert plan["summary"]["nodes_used"] == 2


def test_plan_exits_3_when_a_model_does_not_fit(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    files["models"].write_text("models: [{model_id: huge, gpu_memory_gib: 96}]")
    assert (
        run(["plan", "-c", str(files["cluster"]), "-m", str(files["models"]), "--json", "-"]) == 3
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["unplaced"][0]["reason"].startswith(
        "needs 96.0 GiB per GPU at tensor_parallel_size 1"
    )


def test_bad_input_exits_2_with_one_message(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    files["models"].write_text("models: [{model_id: a, tensor_parallel_size: 0}]")
    assert (
        run(
            [
                "plan",
                "-c",
                str(files["cluster"]),
                "-m",
                str(files["models"]),
                "--json",
                str(files["out"]),
            ]
        )
        == 2
    )
    captured = capsys.readouterr()
    assert "models[0] (id 'a'): tensor_parallel_size" in captured.err
    assert "Traceback" not in captured.err
    assert not files["out"].exists(), "nothing written on bad input"


def test_tensor_parallel_not_dividing_heads_is_bad_input(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source = local_model(tmp_path, "Qwen/Qwen2.5-7B-Instruct")
    files["models"].write_text(
        f"models: [{{model_id: qwen, model_source: {source}, tensor_parallel_size: 8}}]"
    )
    assert run(["plan", "-c", str(files["cluster"]), "-m", str(files["models"])]) == 2
    assert (
        "models[0] (id 'qwen'): tensor_parallel_size must divide num_attention_heads (28)"
        in capsys.readouterr().err
    )


def test_bad_cluster_file_exits_2(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    files["cluster"].write_text(
        "nodes: [{name: a, gpus: [{index: 0, memory_total_mib: 10, memory_free_mib: 20}]}]"
    )
    assert run(["plan", "-c", str(files["cluster"]), "-m", str(files["models"])]) == 2
    assert (
        "nodes[0] (name 'a').gpus[0]: memory_free_mib (20) exceeds memory_total_mib (10)"
        in capsys.readouterr().err
    )


def test_pin_to_unknown_node_exits_2(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    files["models"].write_text("models: [{model_id: a, gpu_memory_gib: 1, node: gpu-z}]")
    assert run(["plan", "-c", str(files["cluster"]), "-m", str(files["models"])]) == 2
    assert "node 'gpu-z' is not in the cluster (nodes: gpu-a, gpu-b)" in capsys.readouterr().err


def test_missing_option_is_a_usage_error_exit_2(files: dict[str, Path]) -> None:
    assert run(["plan", "-m", str(files["models"])]) == 2


def test_estimate_json(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["estimate", "-m", str(files["models"]), "--json", str(files["out"])]) == 0
    assert "Memory per GPU" in capsys.readouterr().out
    rows = {row["model_id"]: row for row in json.loads(files["out"].read_text())}
    assert rows["llama-8b"]["kv_cache_bytes_per_token_per_gpu"] == 131072
    assert rows["llama-8b"]["kv_cache_gib_per_gpu"] == 16.0  # 16 sequences of 8192 tokens
    assert rows["small"]["total_gib_per_gpu"] == 20.0


def test_models_config_environment_is_the_fallback(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "MODELS_CONFIG", json.dumps([{"model_id": "env-model", "gpu_memory_gib": 5}])
    )
    assert run(["plan", "-c", str(files["cluster"]), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["placements"][0]["model_id"] == "env-model"


def test_plan_runs_without_ray_vllm_or_torch(files: dict[str, Path]) -> None:
    # A fresh interpreter in which importing ray, vllm or torch fails, as on a laptop.
    script = (
        "import sys\n"
        "for name in ('ray', 'vllm', 'torch'):\n"
        "    sys.modules[name] = None\n"
        "from deployer.cli.app import main\n"
        f"main(['plan', '-c', {str(files['cluster'])!r}, '-m', {str(files['models'])!r},"
        " '--json', '-'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["summary"]["models_placed"] == 3


def test_python_dash_m_deployer_is_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deployer", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout.startswith("rackserve ")
