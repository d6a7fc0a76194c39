"""What the GPU smoke check measures, as pure functions over text: vLLM's own memory report in an
engine's log, and `nvidia-smi`'s CSV output.

vLLM 0.29 (v1 engine) logs, once per engine (the GPU worker and the engine core):

    Model loading took 0.93 GiB memory and 1.234567 seconds
    Available KV cache memory: 52.10 GiB
    GPU KV cache size: 4,552,112 tokens

tests/gpu/test_measure.py checks these anchors against the installed vLLM's source, so that a
vLLM that words them differently fails here, not on the GPU machine.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Iterable, Mapping

ANCHORS = {
    "weights_gib": "Model loading took %s GiB",
    "kv_cache_gib": "Available KV cache memory: %s GiB",
    "kv_cache_tokens": "GPU KV cache size: %s tokens",
}
"""Each figure's format string prefix, as in vLLM's source (`%s` is the number)."""

_PATTERNS = {
    name: re.compile(re.escape(anchor).replace("%s", r"([0-9][0-9,]*(?:\.[0-9]+)?)"))
    for name, anchor in ANCHORS.items()
}


@dataclasses.dataclass(frozen=True)
class VllmReport:
    """One engine's memory as vLLM reported it; None where its log has no such line."""

    weights_gib: float | None = None
    kv_cache_gib: float | None = None
    kv_cache_tokens: int | None = None

    def missing(self) -> list[str]:
        """The figures not found."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is None]


def parse_vllm_report(lines: Iterable[str]) -> VllmReport:
    """vLLM's figures from an engine's log lines (the last of each, should it restart)."""
    found: dict[str, str] = {}
    for line in lines:
        for name, pattern in _PATTERNS.items():
            match = pattern.search(line)
            if match:
                found[name] = match.group(1).replace(",", "")
    tokens = found.get("kv_cache_tokens")
    return VllmReport(
        weights_gib=float(found["weights_gib"]) if "weights_gib" in found else None,
        kv_cache_gib=float(found["kv_cache_gib"]) if "kv_cache_gib" in found else None,
        kv_cache_tokens=int(float(tokens)) if tokens is not None else None,
    )


@dataclasses.dataclass(frozen=True)
class SmiGpu:
    """One row of `nvidia-smi --query-gpu=index,name,memory.total,memory.free,memory.used`."""

    index: int
    name: str
    total_mib: int
    free_mib: int
    used_mib: int


def parse_smi_gpus(text: str) -> dict[int, SmiGpu]:
    """`nvidia-smi --query-gpu=index,name,memory.total,memory.free,memory.used
    --format=csv,noheader,nounits` by GPU index."""
    gpus = {}
    for row in csv.reader(text.splitlines(), skipinitialspace=True):
        if row:
            index, name, total, free, used = row
            gpus[int(index)] = SmiGpu(int(index), name, int(total), int(free), int(used))
    return gpus


def parse_smi_processes(text: str) -> dict[int, int]:
    """`nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`:
    MiB per PID (summed over GPUs)."""
    used: dict[int, int] = {}
    for row in csv.reader(text.splitlines(), skipinitialspace=True):
        if row and row[1].strip().isdigit():
            used[int(row[0])] = used.get(int(row[0]), 0) + int(row[1])
    return used


def memory_of(pids: Iterable[int], per_pid_mib: Mapping[int, int]) -> tuple[int, list[int]]:
    """MiB held on the GPU by these processes, and which of them hold any."""
    holding = sorted(pid for pid in set(pids) if per_pid_mib.get(pid, 0) > 0)
    return sum(per_pid_mib[pid] for pid in holding), holding
