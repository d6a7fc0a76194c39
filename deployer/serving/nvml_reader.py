"""Read this machine's NVIDIA GPUs through NVML, or its usable memory when it has none.

The NVML calls go through `Nvml`, a protocol that the `pynvml` module (package nvidia-ml-py)
satisfies, so tests pass a fake module with fake devices. A machine without NVML (no driver,
no library) or with zero devices is a CPU node: that is a result, never an error. An NVML
error after a successful init (a GPU fallen off the bus, say) is an error, because a probe
that silently dropped a GPU would mislead the planner.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from deployer.config.cluster import Gpu, Node
from deployer.config.units import MIB
from deployer.errors import RackserveError

MEMINFO = Path("/proc/meminfo")


class NvmlError(RackserveError):
    """NVML initialised but a GPU could not be read."""


class NvmlMemory(Protocol):
    """What `nvmlDeviceGetMemoryInfo` returns: sizes in bytes."""

    @property
    def total(self) -> int:
        """Total device memory, bytes."""

    @property
    def free(self) -> int:
        """Free device memory, bytes."""

    @property
    def used(self) -> int:
        """Used device memory, bytes."""


class NvmlProcess(Protocol):
    """One entry of `nvmlDeviceGetComputeRunningProcesses`."""

    @property
    def pid(self) -> int:
        """The process, as the NVML host numbers it."""

    @property
    def usedGpuMemory(self) -> int | None:  # noqa: N802 - pynvml's name
        """Its memory on the device, bytes; None where NVML cannot tell (pynvml's mapping)."""


class Nvml(Protocol):
    """The part of the `pynvml` module the NVML readers use (here and `engine_memory`)."""

    NVMLError: type[Exception]

    def nvmlInit(self) -> None: ...  # noqa: N802 - pynvml's names
    def nvmlShutdown(self) -> None: ...  # noqa: N802
    def nvmlSystemGetDriverVersion(self) -> str | bytes: ...  # noqa: N802
    def nvmlDeviceGetCount(self) -> int: ...  # noqa: N802
    def nvmlDeviceGetHandleByIndex(self, index: int, /) -> Any: ...  # noqa: N802
    def nvmlDeviceGetName(self, handle: Any, /) -> str | bytes: ...  # noqa: N802
    def nvmlDeviceGetUUID(self, handle: Any, /) -> str | bytes: ...  # noqa: N802
    def nvmlDeviceGetMemoryInfo(self, handle: Any, /) -> NvmlMemory: ...  # noqa: N802
    def nvmlDeviceGetComputeRunningProcesses(  # noqa: N802
        self, handle: Any, /
    ) -> Sequence[NvmlProcess]: ...


def _text(value: str | bytes) -> str:
    """NVML strings: `str` in current nvidia-ml-py, `bytes` in old releases."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def load_pynvml() -> Nvml:
    """The `pynvml` module (ImportError where nvidia-ml-py is not installed)."""
    import pynvml  # noqa: PLC0415 - lazy: only the NVML readers need it

    module: Nvml = pynvml
    return module


def read_gpus(nvml: Nvml | None = None) -> tuple[list[Gpu], str | None]:
    """The GPUs NVML sees and the driver version; `([], None)` when NVML is unavailable."""
    nvml = load_pynvml() if nvml is None else nvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return [], None  # no driver, no library, no permission: a CPU node
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            return [], None
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        gpus = [_read_gpu(nvml, index) for index in range(count)]
    except nvml.NVMLError as exc:
        raise NvmlError(f"NVML initialised but reading the GPUs failed: {exc}") from None
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()
    return gpus, driver


def _read_gpu(nvml: Nvml, index: int) -> Gpu:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = _text(nvml.nvmlDeviceGetName(handle))
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    except nvml.NVMLError as exc:
        raise NvmlError(f"GPU {index}: NVML error: {exc}") from None
    if memory.total < MIB:
        raise NvmlError(f"GPU {index} ({name}): NVML reports {memory.total} bytes of memory")
    return Gpu(
        index=index,
        name=name,
        uuid=uuid or None,
        memory_total_mib=memory.total // MIB,
        memory_free_mib=min(memory.free, memory.total) // MIB,
        memory_used_mib=memory.used // MIB,
    )


def read_available_memory_mib(meminfo: Path = MEMINFO) -> int:
    """`MemAvailable` from /proc/meminfo, in MiB: what a CPU engine may use."""
    try:
        text = meminfo.read_text(encoding="ascii")
    except OSError as exc:
        raise RackserveError(f"cannot read {meminfo}: {exc.strerror or exc}") from None
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key == "MemAvailable":
            fields = rest.split()
            if fields and fields[0].isdigit() and fields[1:] == ["kB"]:
                return int(fields[0]) // 1024
            break
    raise RackserveError(f"{meminfo} has no readable 'MemAvailable: N kB' line")


def read_node(name: str, nvml: Nvml | None = None, meminfo: Path = MEMINFO) -> Node:
    """The machine this runs on as a `Node`: its GPUs, or, with none, its available memory.

    `cpu_memory_mib` is set for CPU nodes only, as the cluster schema says.
    """
    gpus, driver = read_gpus(nvml)
    if gpus:
        return Node(name=name, gpus=gpus, driver_version=driver)
    return Node(name=name, cpu_memory_mib=read_available_memory_mib(meminfo))
