"""The GPU smoke check's readers, without a GPU: vLLM's log lines as the installed vLLM words
them, and nvidia-smi's CSV."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.gpu.measure import (
    ANCHORS,
    VllmReport,
    memory_of,
    parse_smi_gpus,
    parse_smi_processes,
    parse_vllm_report,
)

pytestmark = pytest.mark.unit


def _vllm_sources() -> str:
    """The installed vLLM's v1 engine sources, where its memory report is worded."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed")
    root = Path(spec.origin).parent / "v1"
    return "\n".join(p.read_text(errors="replace") for p in sorted(root.rglob("*.py")))


def test_the_installed_vllm_still_words_its_memory_report_so() -> None:
    sources = _vllm_sources()
    for name, anchor in ANCHORS.items():
        assert f'"{anchor}' in sources, f"{name}: vLLM no longer logs {anchor!r}"


def test_report_is_read_from_log_lines_formatted_like_vllm() -> None:
    lines = [
        "(RayWorkerProc pid=812) INFO 12-03 10:00:01 [gpu_model_runner.py:5472] "
        + ANCHORS["weights_gib"] % "0.93"
        + " memory and 1.234567 seconds",
        "INFO 12-03 10:00:09 [gpu_worker.py:626] " + ANCHORS["kv_cache_gib"] % "52.1",
        "unrelated line",
        "INFO 12-03 10:00:10 [kv_cache_utils.py:2033] "
        + ANCHORS["kv_cache_tokens"] % f"{4_552_112:,}"
        + ", Maximum concurrency for 4,096 tokens per request: 1111.36x",
    ]
    assert parse_vllm_report(lines) == VllmReport(0.93, 52.1, 4_552_112)
    assert parse_vllm_report(lines[:1]).missing() == ["kv_cache_gib", "kv_cache_tokens"]
    restarted = [*lines, ANCHORS["weights_gib"] % "1" + " memory and 2.0 seconds"]
    assert parse_vllm_report(restarted).weights_gib == 1.0  # the last engine start counts


def test_nvidia_smi_csv() -> None:
    gpus = parse_smi_gpus("0, NVIDIA H200, 143771, 140000, 3771\n1, NVIDIA H200, 143771, 1, 2\n")
    assert gpus[0].name == "NVIDIA H200"
    assert (gpus[0].total_mib, gpus[0].free_mib, gpus[0].used_mib) == (143771, 140000, 3771)
    assert sorted(gpus) == [0, 1]
    per_pid = parse_smi_processes("812, 85000\n900, 500\n812, 100\n77, [N/A]\n")
    assert per_pid == {812: 85100, 900: 500}
    assert memory_of([812, 813, 900], per_pid) == (85600, [812, 900])
    assert memory_of([5], per_pid) == (0, [])
