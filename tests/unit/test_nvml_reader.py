"""The NVML reader against fake NVML modules: GPUs, no library, no devices, errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deployer.config.cluster import Cluster, dump_cluster, parse_cluster
from deployer.config.units import MIB
from deployer.errors import RackserveError
from deployer.serving.nvml_reader import (
    NvmlError,
    read_available_memory_mib,
    read_gpus,
    read_node,
)

pytestmark = pytest.mark.unit

H100 = 81559 * MIB


class FakeNVMLError(Exception):
    """Stands for pynvml.NVMLError."""


class FakeLibraryNotFoundError(FakeNVMLError):
    """Stands for pynvml.NVMLError_LibraryNotFound."""


@dataclass(frozen=True)
class FakeMemory:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class FakeDevice:
    name: str | bytes
    uuid: str | bytes
    memory: FakeMemory


@dataclass
class FakeNvml:
    """A module-like object with pynvml's functions over a list of fake devices."""

    devices: list[FakeDevice] = field(default_factory=list)
    driver: str | bytes = "570.124.06"
    init_error: Exception | None = None
    fail_on: str | None = None  # name of a function that raises FakeNVMLError
    initialised: int = 0
    shutdowns: int = 0
    NVMLError: type[Exception] = FakeNVMLError

    def _maybe_fail(self, function: str) -> None:
        if self.fail_on == function:
            raise FakeNVMLError("GPU is lost")

    def nvmlInit(self) -> None:  # noqa: N802
        if self.init_error is not None:
            raise self.init_error
        self.initialised += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str | bytes:  # noqa: N802
        self._maybe_fail("nvmlSystemGetDriverVersion")
        return self.driver

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        self._maybe_fail("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int, /) -> FakeDevice:  # noqa: N802
        self._maybe_fail("nvmlDeviceGetHandleByIndex")
        return self.devices[index]

    def nvmlDeviceGetName(self, handle: FakeDevice, /) -> str | bytes:  # noqa: N802
        return handle.name

    def nvmlDeviceGetUUID(self, handle: FakeDevice, /) -> str | bytes:  # noqa: N802
        return handle.uuid

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice, /) -> FakeMemory:  # noqa: N802
        self._maybe_fail("nvmlDeviceGetMemoryInfo")
        return handle.memory


def h100(uuid: str, used_mib: int = 0) -> FakeDevice:
    used = used_mib * MIB
    return FakeDevice(
        name="NVIDIA H100 80GB HBM3",
        uuid=uuid,
        memory=FakeMemory(total=H100, free=H100 - used, used=used),
    )


@pytest.fixture
def meminfo(tmp_path: Path) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(
        "MemTotal:       24576000 kB\nMemFree:        20000000 kB\nMemAvailable:   22020096 kB\n"
    )
    return path


def test_gpus_are_read_with_memory_in_mib_and_the_driver_version(meminfo: Path) -> None:
    nvml = FakeNvml(devices=[h100("GPU-aaaa"), h100("GPU-bbbb", used_mib=1024)])

    node = read_node("gpu-07", nvml, meminfo)

    assert node.name == "gpu-07"
    assert node.driver_version == "570.124.06"
    assert node.cpu_memory_mib is None  # set for CPU nodes only
    assert [gpu.index for gpu in node.gpus] == [0, 1]
    assert [gpu.uuid for gpu in node.gpus] == ["GPU-aaaa", "GPU-bbbb"]
    assert node.gpus[1].name == "NVIDIA H100 80GB HBM3"
    assert node.gpus[1].memory_total_mib == 81559
    assert node.gpus[1].memory_free_mib == 81559 - 1024
    assert node.gpus[1].memory_used_mib == 1024
    assert (nvml.initialised, nvml.shutdowns) == (1, 1)


def test_the_result_is_the_cluster_schema_plan_reads(meminfo: Path) -> None:
    cluster = Cluster(
        nodes=[
            read_node("gpu-1", FakeNvml(devices=[h100("GPU-a")]), meminfo),
            read_node("cpu-1", FakeNvml(init_error=FakeLibraryNotFoundError()), meminfo),
        ]
    )
    assert parse_cluster(dump_cluster(cluster)) == cluster


def test_bytes_from_old_nvidia_ml_py_are_decoded() -> None:
    device = FakeDevice(name=b"Tesla T4", uuid=b"GPU-t4", memory=FakeMemory(16 * 1024**3, 0, 0))

    gpus, driver = read_gpus(FakeNvml(devices=[device], driver=b"535.54.03"))

    assert driver == "535.54.03"
    assert (gpus[0].name, gpus[0].uuid) == ("Tesla T4", "GPU-t4")


def test_partial_mib_rounds_down_and_free_never_exceeds_total() -> None:
    memory = FakeMemory(total=1000 * MIB + 7, free=1000 * MIB + 9, used=MIB - 1)
    gpus, _ = read_gpus(FakeNvml(devices=[FakeDevice("X", "GPU-x", memory)]))
    assert (gpus[0].memory_total_mib, gpus[0].memory_free_mib, gpus[0].memory_used_mib) == (
        1000,
        1000,
        0,
    )


@pytest.mark.parametrize(
    "init_error",
    [FakeLibraryNotFoundError("NVML Shared Library Not Found"), FakeNVMLError("Driver Not Loaded")],
)
def test_no_nvml_is_a_cpu_node_with_available_memory(init_error: Exception, meminfo: Path) -> None:
    nvml = FakeNvml(init_error=init_error)

    node = read_node("cpu-1", nvml, meminfo)

    assert node.is_cpu_node
    assert node.cpu_memory_mib == 22020096 // 1024
    assert node.driver_version is None
    assert nvml.shutdowns == 0  # never initialised, so never shut down


def test_zero_devices_is_a_cpu_node(meminfo: Path) -> None:
    nvml = FakeNvml(devices=[])

    node = read_node("cpu-2", nvml, meminfo)

    assert node.is_cpu_node
    assert node.cpu_memory_mib == 21504
    assert node.driver_version is None
    assert nvml.shutdowns == 1


@pytest.mark.parametrize(
    "function",
    [
        "nvmlDeviceGetCount",
        "nvmlSystemGetDriverVersion",
        "nvmlDeviceGetHandleByIndex",
        "nvmlDeviceGetMemoryInfo",
    ],
)
def test_an_nvml_error_after_init_is_an_error_not_a_cpu_node(function: str) -> None:
    nvml = FakeNvml(devices=[h100("GPU-a")], fail_on=function)

    with pytest.raises(NvmlError, match="GPU is lost"):
        read_gpus(nvml)
    assert nvml.shutdowns == 1


def test_an_error_names_the_gpu() -> None:
    with pytest.raises(NvmlError, match=r"^GPU 0: NVML error: GPU is lost$"):
        read_gpus(FakeNvml(devices=[h100("GPU-a")], fail_on="nvmlDeviceGetMemoryInfo"))


def test_a_gpu_without_memory_is_an_error() -> None:
    device = FakeDevice("Broken", "GPU-0", FakeMemory(total=0, free=0, used=0))
    with pytest.raises(NvmlError, match=r"GPU 0 \(Broken\): NVML reports 0 bytes"):
        read_gpus(FakeNvml(devices=[device]))


def test_the_real_pynvml_on_this_machine_gives_a_node() -> None:
    """Whatever this machine has: a GPU node, or a CPU node with its memory, never an error."""
    node = read_node("here")
    assert node.gpus or (node.cpu_memory_mib is not None and node.cpu_memory_mib > 0)


def test_meminfo_without_mem_available_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text("MemTotal: 1024 kB\nMemFree: 512 kB\n")
    with pytest.raises(RackserveError, match="no readable 'MemAvailable: N kB' line"):
        read_available_memory_mib(path)


def test_missing_meminfo_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RackserveError, match=r"cannot read .*nothing"):
        read_available_memory_mib(tmp_path / "nothing")
