"""The one module that talks to NVML (nvidia-ml-py). Every failure means "not available"; no exception leaves here."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

_lock = threading.Lock()
_initialised: bool | None = None
_SNAPSHOT_TTL_S = 1.0
_snapshot_cache: dict[int, tuple[float, "NvmlMemory"]] = {}


@dataclass(frozen=True)
class NvmlDevice:
    index: int
    name: str
    uuid: str
    compute_capability: tuple[int, int]
    total_bytes: int
    free_bytes: int
    used_bytes: int
    driver: str
    cuda_driver_version: str
    memory_bus_width_bits: int
    max_memory_clock_mhz: int


@dataclass(frozen=True)
class NvmlMemory:
    total_bytes: int
    free_bytes: int
    used_bytes: int


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _init() -> bool:
    """Lazy, once per process; a missing library or driver is remembered as unavailable."""
    global _initialised
    with _lock:
        if _initialised is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _initialised = True
            except Exception:
                _initialised = False
        return _initialised


def available() -> bool:
    return _init()


def _physical_count() -> int:
    try:
        import pynvml

        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0


def visible_physical_indices() -> list[int]:
    """NVML's index of each GPU CUDA numbers 0, 1, ...: all of them in NVML's order, or as CUDA_VISIBLE_DEVICES lists
    them (indices or UUID prefixes; CUDA stops at the first entry that names no GPU). Every index this module takes
    is CUDA's, as torch's cuda:N is: on a server shared through CUDA_VISIBLE_DEVICES, cuda:0 is not NVML's GPU 0.
    (Integer entries follow CUDA's device order, which is NVML's PCI order with CUDA_DEVICE_ORDER=PCI_BUS_ID and on
    machines of one GPU model.)"""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    cached = _visible_cache.get(raw)
    if cached is None:
        cached = _visible_cache[raw] = _visible_physical_indices(raw)
    return list(cached)


_visible_cache: dict[str | None, list[int]] = {}


def _visible_physical_indices(raw: str | None) -> list[int]:
    count = _physical_count()
    if raw is None:
        return list(range(count))
    import pynvml

    uuids = [_safe(lambda i=i: _text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))), "")
             for i in range(count)]
    entries = [part.strip() for part in raw.split(",")] if raw.strip() else []
    if not any(uuids) and any(not entry.lstrip("-").isdigit() for entry in entries):
        return list(range(count))  # UUIDs named but NVML gives none to match them: all GPUs, as before, not none
    visible: list[int] = []
    for entry in entries:
        if entry.lstrip("-").isdigit():
            index = int(entry)
        else:
            index = next((i for i, uuid in enumerate(uuids) if uuid and uuid.startswith(entry)), -1)
        if not 0 <= index < count or index in visible:
            break
        visible.append(index)
    return visible


def _handle(index: int):
    """The NVML handle of CUDA's device `index`."""
    import pynvml

    return pynvml.nvmlDeviceGetHandleByIndex(visible_physical_indices()[index])


def device_count() -> int:
    """GPUs CUDA sees (CUDA_VISIBLE_DEVICES applied)."""
    if not _init():
        return 0
    try:
        return len(visible_physical_indices())
    except Exception:
        return 0


def _safe(call, default):
    try:
        return call()
    except Exception:
        return default


def devices() -> tuple[NvmlDevice, ...]:
    """All GPUs NVML sees; an empty tuple without a driver."""
    if not _init():
        return ()
    import pynvml

    driver = _safe(lambda: _text(pynvml.nvmlSystemGetDriverVersion()), "")
    cuda_raw = _safe(pynvml.nvmlSystemGetCudaDriverVersion, 0)
    cuda_driver = f"{cuda_raw // 1000}.{(cuda_raw % 1000) // 10}" if cuda_raw else ""
    found = []
    for index in range(device_count()):
        try:
            handle = _handle(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            found.append(
                NvmlDevice(
                    index=index,
                    name=_safe(lambda: _text(pynvml.nvmlDeviceGetName(handle)), "unknown GPU"),
                    uuid=_safe(lambda: _text(pynvml.nvmlDeviceGetUUID(handle)), f"gpu-{index}"),
                    compute_capability=tuple(_safe(lambda: pynvml.nvmlDeviceGetCudaComputeCapability(handle), (0, 0))),
                    total_bytes=int(memory.total),
                    free_bytes=int(memory.free),
                    used_bytes=int(memory.used),
                    driver=driver,
                    cuda_driver_version=cuda_driver,
                    memory_bus_width_bits=int(_safe(lambda: pynvml.nvmlDeviceGetMemoryBusWidth(handle), 0)),
                    max_memory_clock_mhz=int(
                        _safe(lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM), 0)
                    ),
                )
            )
        except Exception:
            continue
    return tuple(found)


def memory(index: int = 0) -> NvmlMemory | None:
    """Device memory as the driver sees it (all processes, non-torch memory included); cached for a second."""
    now = time.monotonic()
    cached = _snapshot_cache.get(index)
    if cached and now - cached[0] < _SNAPSHOT_TTL_S:
        return cached[1]
    return memory_now(index)


def memory_now(index: int = 0) -> NvmlMemory | None:
    """Uncached, for measurements that must see the latest value."""
    if not _init():
        return None
    try:
        import pynvml

        info = pynvml.nvmlDeviceGetMemoryInfo(_handle(index))
        snapshot = NvmlMemory(int(info.total), int(info.free), int(info.used))
    except Exception:
        return None
    _snapshot_cache[index] = (time.monotonic(), snapshot)
    return snapshot


def process_used_bytes(pid: int, index: int = 0) -> int | None:
    """Memory NVML attributes to one process; None where containers hide processes."""
    if not _init():
        return None
    try:
        import pynvml

        handle = _handle(index)
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == pid and process.usedGpuMemory is not None:
                return int(process.usedGpuMemory)
    except Exception:
        return None
    return None
