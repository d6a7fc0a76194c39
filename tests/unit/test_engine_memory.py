"""Engine memory: the node-side reader (fake NVML on the GPU path, real processes on the CPU
path) and how actors and readings map to models."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deployer.config.units import GIB
from deployer.serving.engine_memory import (
    ActorRow,
    ProcessMemory,
    engine_pids,
    process_tree,
    read_process_memory,
    usage_of,
)

MB = 1_000_000


class FakeNVMLError(Exception):
    """Stands for pynvml.NVMLError."""


@dataclass(frozen=True)
class FakeProcess:
    pid: int
    usedGpuMemory: int | None  # noqa: N815 - pynvml's name


@dataclass
class FakeNvml:
    """pynvml's functions over devices, each a list of compute processes."""

    devices: list[list[FakeProcess]]
    init_error: bool = False
    fail_on_device: int | None = None
    shutdowns: int = 0
    NVMLError: type[Exception] = FakeNVMLError
    asked: list[int] = field(default_factory=list)

    def nvmlInit(self) -> None:  # noqa: N802
        if self.init_error:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int, /) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int, /) -> list[FakeProcess]:  # noqa: N802
        self.asked.append(handle)
        if handle == self.fail_on_device:
            raise FakeNVMLError("GPU is lost")
        return self.devices[handle]


# The engine: this test process (a real PID); the stranger: its parent, not a descendant.
ENGINE, STRANGER = os.getpid(), os.getppid()


@pytest.mark.unit
def test_gpu_memory_counts_only_the_engines_processes_per_nvml_index() -> None:
    nvml = FakeNvml(
        devices=[
            [FakeProcess(ENGINE, 1 * GIB), FakeProcess(STRANGER, 5 * GIB)],
            [FakeProcess(STRANGER, 3 * GIB), FakeProcess(ENGINE, 2 * GIB)],
            [FakeProcess(STRANGER, 7 * GIB)],
        ]
    )

    reading = read_process_memory([ENGINE], nvml)  # type: ignore[arg-type]

    assert reading.gpu_bytes == {0: 1 * GIB, 1: 2 * GIB, 2: 0}
    assert reading.rss_bytes > 0
    assert nvml.asked == [0, 1, 2]
    assert nvml.shutdowns == 1


@pytest.mark.unit
def test_a_device_whose_figure_nvml_cannot_tell_is_left_out() -> None:
    nvml = FakeNvml(
        devices=[
            [FakeProcess(ENGINE, None)],  # NVML_VALUE_NOT_AVAILABLE, as pynvml maps it
            [FakeProcess(STRANGER, None), FakeProcess(ENGINE, 4 * GIB)],
        ]
    )

    assert read_process_memory([ENGINE], nvml).gpu_bytes == {1: 4 * GIB}  # type: ignore[arg-type]


@pytest.mark.unit
@pytest.mark.parametrize(
    "nvml",
    [
        FakeNvml(devices=[[FakeProcess(ENGINE, GIB)]], init_error=True),
        FakeNvml(devices=[[FakeProcess(ENGINE, GIB)], []], fail_on_device=1),
    ],
    ids=["no-nvml", "gpu-lost"],
)
def test_failing_nvml_gives_no_gpu_figures_but_the_resident_memory(nvml: FakeNvml) -> None:
    reading = read_process_memory([ENGINE], nvml)  # type: ignore[arg-type]

    assert reading.gpu_bytes == {}
    assert reading.rss_bytes > 0
    assert nvml.shutdowns == (0 if nvml.init_error else 1)


HOLD = """
import os, subprocess, sys, time
block = bytearray(int(sys.argv[1]))
for i in range(0, len(block), 4096):
    block[i] = 1  # touch every page: resident, not just reserved
pids = [str(os.getpid())]
if sys.argv[2:]:
    rest = [sys.executable, __file__, *sys.argv[2:]]
    child = subprocess.Popen(rest, stdout=subprocess.PIPE, text=True)
    pids += child.stdout.readline().split()[1:]
print("ready", *pids, flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def holding(script: Path, *sizes: int) -> Iterator[list[int]]:
    """A process holding sizes[0] bytes, its child sizes[1], ...; their PIDs, killed after."""
    process = subprocess.Popen(
        [sys.executable, str(script), *map(str, sizes)], stdout=subprocess.PIPE, text=True
    )
    pids = [process.pid]
    try:
        assert process.stdout is not None
        words = process.stdout.readline().split()
        assert words[:1] == ["ready"], "the holding process failed to start"
        pids = [int(word) for word in words[1:]]
        yield pids
    finally:
        for pid in reversed(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.mark.integration
def test_resident_memory_of_a_real_process_tree_excludes_strangers(tmp_path: Path) -> None:
    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    with holding(script, 150 * MB, 100 * MB) as engine, holding(script, 300 * MB) as stranger:
        assert process_tree(engine[:1]) == set(engine)  # the child found as a descendant

        reading = read_process_memory(engine[:1])  # the real NVML, or none on this host
        alone = read_process_memory(stranger)

    assert reading.rss_bytes >= 250 * MB
    assert reading.rss_bytes < 350 * MB  # the stranger's 300 MB would make it 550 or more
    assert alone.rss_bytes >= 300 * MB
    assert all(used == 0 for used in reading.gpu_bytes.values())  # no GPU in these processes


@pytest.mark.integration
def test_processes_gone_are_skipped() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    assert process_tree([gone.pid]) == set()
    assert read_process_memory([gone.pid]).rss_bytes == 0


def actor(name: str, pid: int, node: str = "n1", group: str = "") -> ActorRow:
    return ActorRow(name=name, pid=pid, node_id=node, placement_group_id=group)


@pytest.mark.unit
def test_an_engine_is_its_replicas_and_the_actors_of_their_placement_groups() -> None:
    actors = [
        actor("SERVE_REPLICA::rackserve-model:org/tp#engine#r1", 100, group="pg1"),
        actor("", 101, group="pg1"),  # a tensor-parallel worker of that engine
        actor("", 102, node="n2", group="pg1"),
        actor("SERVE_REPLICA::rackserve-model:small#engine#r2", 200),  # no placement group
        actor("SERVE_REPLICA::rackserve-model:small#engine#r3", 0),  # not created yet
        actor("SERVE_REPLICA::rackserve#RackserveIngress#i1", 300, group="pg3"),
        actor("", 301, group="pg3"),
        actor("", 400),  # someone else's, in no group either
        actor("SERVE_REPLICA::rackserve-model:gone#engine#r4", 500, group="pg5"),
    ]

    found = engine_pids(actors, ["org/tp", "small"])

    assert found == {"org/tp": {"n1": {100, 101}, "n2": {102}}, "small": {"n1": {200}}}


@pytest.mark.unit
def test_usage_per_model_sums_its_nodes_and_leaves_out_one_with_a_node_unread() -> None:
    engines = {
        "a": {"n1": {1}},
        "b": {"n1": {2}, "n2": {3}},
        "c": {"n3": {4}},
        "d": {"n1": {5}, "n2": {6}},
    }
    readings = {
        "n1": {
            "a": ProcessMemory(5 * GIB, {0: 7 * GIB, 1: 0}),
            "b": ProcessMemory(1, {}),
            "d": ProcessMemory(2 * GIB, {}),
        },
        "n2": {"d": ProcessMemory(3 * GIB, {})},  # b's process there was not read; n3 not at all
    }

    assert usage_of(engines, readings) == {
        "a": {None: 5 * GIB, 0: 7 * GIB, 1: 0},
        "d": {None: 5 * GIB},
    }
