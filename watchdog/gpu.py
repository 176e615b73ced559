"""GPU samples from NVML, in-process: utilisation, memory, and which processes hold the memory.

The incident's evidence is "0 % utilisation while 40-50 GB per GPU are in use", and the question
after it is "held by whom?". NVML answers both without forking nvidia-smi every tick. pynvml and
psutil are imported on first use so that importing this module (CLI help, the daemon's start)
stays cheap and works on hosts without the bindings.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Callable, Optional, TypeVar

T = TypeVar("T")
MIB = 1024 * 1024
# The kernel gives the initial pid namespace this fixed inode (PROC_PID_INIT_INO).
_INIT_PID_NS_INODE = 0xEFFFFFFC


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_mib: Optional[float]  # None: the driver does not account per process (e.g. Windows WDDM)
    user: Optional[str]
    cmdline: Optional[str]
    status: str  # "running" | "zombie" | "gone" | "other pid namespace"


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    uuid: str
    util_pct: Optional[float]
    mem_used_mib: float
    mem_total_mib: float
    temperature_c: Optional[float]
    power_w: Optional[float]
    processes: tuple[GpuProcess, ...]


@dataclass(frozen=True)
class NvmlInfo:
    driver_version: str
    cuda_driver_version: Optional[str]
    gpus: tuple[GpuSample, ...]


class NvmlUnavailable(Exception):
    """NVML cannot be used (no driver, no bindings, or a query failed); the message says which."""


def _in_init_pid_namespace() -> bool:
    """NVML reports host pids. Inside a container's own pid namespace the same number names a
    different process (or none), so looking it up here would attribute memory to the wrong one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino == _INIT_PID_NS_INODE
    except OSError:
        return False


def _describe(pid: int, used_mib: Optional[float], host_pids: bool) -> GpuProcess:
    """Who holds this GPU memory: user and command line from psutil, or why they are unknown."""
    if not host_pids:
        return GpuProcess(pid, used_mib, None, None, "other pid namespace")
    import psutil

    def attempt(read: Callable[[], T]) -> Optional[T]:
        try:
            return read()
        except psutil.AccessDenied:
            return None

    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            user = attempt(proc.username)
            cmdline = attempt(proc.cmdline)
    except psutil.ZombieProcess:
        return GpuProcess(pid, used_mib, None, None, "zombie")
    except psutil.NoSuchProcess:
        return GpuProcess(pid, used_mib, None, None, "gone")
    return GpuProcess(pid, used_mib, user, " ".join(cmdline) if cmdline else None, "running")


class Nvml:
    """NVML initialised once per process (nvmlInit in __init__, nvmlShutdown in close); context manager."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as err:
            raise NvmlUnavailable(f"the NVML bindings are not installed (pip install nvidia-ml-py): {err}") from None
        self._nv = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            raise NvmlUnavailable(f"no NVIDIA driver found: libnvidia-ml.so.1 cannot be loaded ({_dlopen_error()})") from None
        except pynvml.NVMLError_DriverNotLoaded:
            raise NvmlUnavailable("no NVIDIA driver loaded: libnvidia-ml.so.1 is installed but the kernel module is not (see dmesg)") from None
        except pynvml.NVMLError as err:
            raise NvmlUnavailable(f"NVML initialisation failed: {err}") from None
        self._open = True
        self._host_pids = _in_init_pid_namespace()

    def __enter__(self) -> "Nvml":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release NVML once; a failing shutdown leaves nothing for the caller to do, so it is quiet."""
        if self._open:
            self._open = False
            with contextlib.suppress(self._nv.NVMLError):
                self._nv.nvmlShutdown()

    def _optional(self, query: Callable[[], T]) -> Optional[T]:
        """A query some GPUs do not support (temperature, power, utilisation) gives None."""
        try:
            return query()
        except self._nv.NVMLError_NotSupported:
            return None

    def sample(self) -> NvmlInfo:
        """Every GPU now; any failure other than an unsupported field raises NvmlUnavailable."""
        nv = self._nv
        try:
            cuda = self._optional(nv.nvmlSystemGetCudaDriverVersion)
            gpus = tuple(self._gpu(i) for i in range(nv.nvmlDeviceGetCount()))
            return NvmlInfo(
                driver_version=nv.nvmlSystemGetDriverVersion(),
                cuda_driver_version=None if cuda is None else f"{cuda // 1000}.{cuda % 1000 // 10}",
                gpus=gpus,
            )
        except nv.NVMLError as err:
            raise NvmlUnavailable(f"NVML query failed: {err}") from None

    def _gpu(self, index: int) -> GpuSample:
        nv = self._nv
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        memory = nv.nvmlDeviceGetMemoryInfo(handle)
        util = self._optional(lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu)
        temperature = self._optional(lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
        milliwatts = self._optional(lambda: nv.nvmlDeviceGetPowerUsage(handle))
        return GpuSample(
            index=index,
            name=nv.nvmlDeviceGetName(handle),
            uuid=nv.nvmlDeviceGetUUID(handle),
            util_pct=None if util is None else float(util),
            mem_used_mib=memory.used / MIB,
            mem_total_mib=memory.total / MIB,
            temperature_c=None if temperature is None else float(temperature),
            power_w=None if milliwatts is None else milliwatts / 1000,
            processes=self._processes(handle),
        )

    def _processes(self, handle) -> tuple[GpuProcess, ...]:
        """Compute and graphics contexts, one entry per pid (a process may hold both)."""
        nv = self._nv
        seen: dict[int, Optional[float]] = {}
        for query in (nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetGraphicsRunningProcesses):
            for proc in self._optional(lambda: query(handle)) or []:
                used = proc.usedGpuMemory
                seen.setdefault(proc.pid, None if used is None else used / MIB)
        return tuple(_describe(pid, used, self._host_pids) for pid, used in seen.items())


def _dlopen_error() -> str:
    """pynvml swallows the loader's reason; ask the loader again to show it."""
    import ctypes

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as err:
        return str(err)
    return "the library loads now but did not when NVML was initialised"


def idle_busy(gpus, util_max_pct: float, mem_min_mib: float) -> list[GpuSample]:
    """The incident's signature (`watchdog.alerts.idle_but_busy`): models resident, nothing computed."""
    from watchdog.alerts import idle_but_busy

    return [g for g in gpus if idle_but_busy(g.util_pct, g.mem_used_mib, util_max_pct=util_max_pct, mem_min_mib=mem_min_mib)]


def to_dict(info: NvmlInfo) -> dict:
    """JSON-ready: plain dicts and lists, None for what the GPU did not report."""
    data = asdict(info)
    data["gpus"] = [{**gpu, "processes": list(gpu["processes"])} for gpu in data["gpus"]]
    return data
