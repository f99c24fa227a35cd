"""Hardware profile: GPUs (through elite_core.nvml), measured usable memory and matmul speed, CPU, RAM, disk, capabilities.

Measured, not trusted from spec sheets: the usable memory comes from an allocation probe, TFLOPS from timed matmuls,
bandwidth from a timed device copy, all in a child process (its CUDA context ends with it). The profile is cached per
machine (GPU UUIDs + driver + torch version); the values that change between runs (free memory, available RAM, free
disk) are re-read cheaply on every call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from elite_core import nvml

PROFILE_VERSION = 1
MIB = 1024**2
GIB = 1024**3
_PROBE_TIME_LIMIT_S = 5.0
_PROBE_LEAVE_FREE_BYTES = 256 * MIB

ProgressCallback = Callable[[str, float], None]


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    architecture: str
    compute_capability: tuple[int, int]
    total_bytes: int
    free_bytes: int
    usable_bytes: int
    """What one training process can hold, its own CUDA context included (allocation probe)."""
    tflops_bf16: float
    tflops_fp16: float
    tflops_fp32: float
    bandwidth_bytes_per_s: float
    driver: str


@dataclass(frozen=True)
class Capability:
    name: str
    available: bool
    detail: str
    fallback: str
    """What the engine does instead when this is missing."""


@dataclass(frozen=True)
class HardwareProfile:
    gpus: tuple[GpuInfo, ...]
    cpu_name: str
    cpu_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int
    cpu_gflops_fp32: float
    capabilities: tuple[Capability, ...]
    torch_version: str
    cuda_version: str
    profiled_s: float
    """Seconds the measurement took (0 when read from the cache)."""
    from_cache: bool = False

    @property
    def has_gpu(self) -> bool:
        return len(self.gpus) > 0

    @property
    def device(self) -> str:
        return "cuda" if self.has_gpu else "cpu"

    def for_device(self, device: str) -> HardwareProfile:
        """The machine as a run on `device` (config.device) sees it: with device cpu, without its GPUs, so that a run
        put on the CPU of a GPU machine is planned as the CPU run it is (RAM budget, fp32, eager layers). Planned
        with the GPUs, it ran bf16 layers compiled for CUDA on the CPU without autocast and failed on its first step."""
        if device == "cpu" and self.has_gpu:
            return dataclasses.replace(self, gpus=())
        return self

    @property
    def memory_budget_bytes(self) -> int:
        """GPU 0's usable memory, or the RAM available on a CPU-only machine."""
        if self.has_gpu:
            return self.gpus[0].usable_bytes
        return self.ram_available_bytes

    def capability(self, name: str) -> Capability | None:
        for capability in self.capabilities:
            if capability.name == name:
                return capability
        return None

    def can(self, name: str) -> bool:
        capability = self.capability(name)
        return capability is not None and capability.available

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["version"] = PROFILE_VERSION
        for gpu in data["gpus"]:
            gpu["compute_capability"] = list(gpu["compute_capability"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HardwareProfile":
        values = {key: value for key, value in data.items() if key != "version"}
        values["gpus"] = tuple(_gpu_from_dict(gpu) for gpu in data["gpus"])
        values["capabilities"] = tuple(Capability(**capability) for capability in data["capabilities"])
        return cls(**values)


def architecture_name(compute_capability: tuple[int, int]) -> str:
    major, minor = compute_capability
    if major >= 10:
        return "Blackwell"
    if major == 9:
        return "Hopper"
    if major == 8:
        return "Ada" if minor >= 9 else "Ampere"
    if major == 7:
        return "Turing" if minor >= 5 else "Volta"
    if major == 6:
        return "Pascal"
    return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _disk_free_bytes(output_dir: str | os.PathLike | None) -> int:
    path = Path(output_dir or ".").absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return 0


def _ram() -> tuple[int, int]:
    import psutil

    memory = psutil.virtual_memory()
    return int(memory.total), int(memory.available)


def _torch_versions() -> tuple[str, str]:
    try:
        import torch
    except Exception:
        return "", ""
    return str(torch.__version__), str(torch.version.cuda or "")


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def detect_capabilities(gpus: tuple[GpuInfo, ...]) -> tuple[Capability, ...]:
    """What the engine can turn on here, and what it falls back to when something is missing."""
    has_gpu = bool(gpus)
    major = min((gpu.compute_capability[0] for gpu in gpus), default=0)
    bf16 = has_gpu and major >= 8
    flash_attn = has_gpu and major >= 8 and _has_module("flash_attn")
    sdpa_flash = has_gpu and major >= 8
    bitsandbytes = has_gpu and _has_module("bitsandbytes")
    deepspeed = has_gpu and _has_module("deepspeed")
    triton = has_gpu and _has_module("triton")
    cpu_note = "no CUDA GPU"
    return (
        Capability(
            "bf16",
            bf16,
            f"compute capability {major}.x" if has_gpu else cpu_note,
            "fp16 with loss scaling on GPUs before Ampere; fp32 on CPU",
        ),
        Capability(
            "flash-attn",
            flash_attn,
            "flash_attn installed" if flash_attn else ("not installed" if has_gpu else cpu_note),
            "SDPA (torch's own flash or memory-efficient kernel)",
        ),
        Capability(
            "sdpa-flash",
            sdpa_flash,
            "torch SDPA flash backend (Ampere or newer)" if sdpa_flash else ("GPU older than Ampere" if has_gpu else cpu_note),
            "SDPA memory-efficient or math backend",
        ),
        Capability(
            "bitsandbytes",
            bitsandbytes,
            "QLoRA 4-bit and 8-bit AdamW" if bitsandbytes else ("not installed" if has_gpu else cpu_note),
            "bf16 weights and torch AdamW (fp32 state)",
        ),
        Capability(
            "deepspeed",
            deepspeed,
            "ZeRO-2/3 with CPU offload" if deepspeed else ("not installed" if has_gpu else cpu_note),
            "plain single-process training",
        ),
        Capability(
            "triton",
            triton,
            "triton kernels" if triton else ("not installed" if has_gpu else cpu_note),
            "torch kernels",
        ),
    )


def _time_gpu(torch, fn, repeats: int) -> float:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / repeats


def _matmul_tflops(torch, device, dtype, size: int, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    torch.cuda.synchronize()
    seconds = _time_gpu(torch, lambda: torch.mm(a, b), repeats)
    del a, b
    return 2.0 * size**3 / seconds / 1e12


def _copy_bandwidth(torch, device, size_bytes: int = GIB, repeats: int = 10) -> float:
    source = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize()
    seconds = _time_gpu(torch, lambda: target.copy_(source), repeats)
    del source, target
    return 2.0 * size_bytes / seconds


def _usable_bytes_probe(torch, device, free_before_init: int) -> int:
    """Allocate in shrinking chunks until the allocator refuses (or time runs out), then free everything.

    The result counts this process's CUDA context, as the training process will pay for its own.
    """
    chunks = []
    allocated = 0
    chunk = GIB
    started = time.monotonic()
    try:
        while chunk >= 64 * MIB and time.monotonic() - started < _PROBE_TIME_LIMIT_S:
            free_now, _ = torch.cuda.mem_get_info(device)
            if free_now - chunk < _PROBE_LEAVE_FREE_BYTES:
                chunk //= 2
                continue
            try:
                chunks.append(torch.empty(chunk, dtype=torch.uint8, device=device))
                allocated += chunk
            except torch.OutOfMemoryError:
                chunk //= 2
        free_after, _ = torch.cuda.mem_get_info(device)
    finally:
        chunks.clear()
        torch.cuda.empty_cache()
    # What was free before this process started, less what stayed free with the probe holding all it could.
    return max(0, free_before_init - free_after) if free_before_init else allocated


def _measure_gpu(torch, device_info: nvml.NvmlDevice | None, index: int, report: Callable[[str], None]) -> GpuInfo:
    device = torch.device("cuda", index)
    properties = torch.cuda.get_device_properties(index)
    free_before_init = device_info.free_bytes if device_info else 0
    with torch.cuda.device(index):
        report(f"GPU {index}: allocation probe")
        torch.cuda.init()
        if not free_before_init:
            free_before_init, _ = torch.cuda.mem_get_info(device)
        usable = _usable_bytes_probe(torch, device, free_before_init)
        report(f"GPU {index}: bf16 matmul")
        bf16 = _matmul_tflops(torch, device, torch.bfloat16, 8192) if properties.major >= 8 else 0.0
        report(f"GPU {index}: fp16 matmul")
        fp16 = _matmul_tflops(torch, device, torch.float16, 8192)
        report(f"GPU {index}: fp32 matmul")
        fp32 = _matmul_tflops(torch, device, torch.float32, 4096, repeats=5)
        report(f"GPU {index}: memory bandwidth")
        bandwidth = _copy_bandwidth(torch, device)
        torch.cuda.empty_cache()
        free_now, total = torch.cuda.mem_get_info(device)
    capability = (int(properties.major), int(properties.minor))
    return GpuInfo(
        index=index,
        name=device_info.name if device_info else str(properties.name),
        uuid=device_info.uuid if device_info else str(getattr(properties, "uuid", f"gpu-{index}")),
        architecture=architecture_name(capability),
        compute_capability=capability,
        total_bytes=int(device_info.total_bytes if device_info else total),
        free_bytes=int(device_info.free_bytes if device_info else free_now),
        usable_bytes=int(min(usable, device_info.total_bytes if device_info else total)),
        tflops_bf16=round(bf16, 1),
        tflops_fp16=round(fp16, 1),
        tflops_fp32=round(fp32, 1),
        bandwidth_bytes_per_s=float(round(bandwidth, -6)),
        driver=device_info.driver if device_info else "",
    )


def measure_cpu_gflops(seconds: float = 0.3, size: int = 1024, windows: int = 3) -> float:
    """fp32 matmul speed of this process's CPU threads: the best of a few short windows, so a busy moment on a
    shared machine does not end up in the cached profile."""
    try:
        import torch
    except Exception:
        return 0.0
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    best = 0.0
    for _ in range(windows):
        runs = 0
        started = time.perf_counter()
        while True:
            torch.mm(a, b)
            runs += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds / windows:
                break
        best = max(best, 2.0 * size**3 * runs / elapsed / 1e9)
    return round(best, 1)


def default_cache_dir() -> Path:
    override = os.environ.get("ELITE_TUI_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "elite-tui"


def _machine_key(devices: tuple[nvml.NvmlDevice, ...], torch_version: str) -> str:
    if devices:
        parts = [device.uuid for device in devices] + [devices[0].driver]
    else:
        parts = [platform.node(), _cpu_name(), str(_cpu_cores())]
    parts.append(torch_version)
    parts.append(str(PROFILE_VERSION))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _refresh_volatile(profile: HardwareProfile, devices: tuple[nvml.NvmlDevice, ...], output_dir) -> HardwareProfile:
    """A cached profile with today's free GPU memory, available RAM, free disk and installed libraries (a user told
    to pip install bitsandbytes would otherwise be told again until --reprofile)."""
    by_index = {device.index: device for device in devices}
    gpus = []
    for gpu in profile.gpus:
        current = by_index.get(gpu.index)
        if current is None:
            gpus.append(gpu)
            continue
        # Another process may hold memory now that the probe saw free, or have let go of what it held then: the
        # budget moves with the free memory (it never rose, so a profile made beside another job stayed that small).
        usable = gpu.usable_bytes + current.free_bytes - gpu.free_bytes
        gpus.append(dataclasses.replace(gpu, free_bytes=current.free_bytes,
                                        usable_bytes=int(max(0, min(usable, current.free_bytes, gpu.total_bytes)))))
    ram_total, ram_available = _ram()
    return dataclasses.replace(
        profile,
        gpus=tuple(gpus),
        ram_total_bytes=ram_total,
        ram_available_bytes=ram_available,
        disk_free_bytes=_disk_free_bytes(output_dir),
        capabilities=detect_capabilities(profile.gpus),
        profiled_s=0.0,
        from_cache=True,
    )


def profile_hardware(
    output_dir: str | os.PathLike | None = None,
    *,
    use_cache: bool = True,
    progress: ProgressCallback | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> HardwareProfile:
    """Profile this machine; never raises for a missing driver, GPU or torch (that gives a CPU-only profile)."""
    started = time.perf_counter()

    def report(stage: str, fraction: float) -> None:
        if progress is not None:
            progress(stage, fraction)

    report("reading GPUs", 0.0)
    devices = nvml.devices()
    torch_version, cuda_version = _torch_versions()
    cache_path = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_file = cache_path / f"hardware-{_machine_key(devices, torch_version)}.json"
    if use_cache and cache_file.exists():
        try:
            cached = HardwareProfile.from_dict(json.loads(cache_file.read_text()))
            report("read from cache", 1.0)
            return _refresh_volatile(cached, devices, output_dir)
        except (OSError, ValueError, TypeError, KeyError):
            pass

    gpus: list[GpuInfo] = []
    cuda_ready = False
    if torch_version:
        try:
            import torch

            cuda_ready = torch.cuda.is_available()
        except Exception:
            cuda_ready = False
    if cuda_ready:
        gpus = _measure_gpus_in_child(report)

    report("measuring CPU", 0.9)
    ram_total, ram_available = _ram()
    gpu_tuple = tuple(gpus)
    profile = HardwareProfile(
        gpus=gpu_tuple,
        cpu_name=_cpu_name(),
        cpu_cores=_cpu_cores(),
        ram_total_bytes=ram_total,
        ram_available_bytes=ram_available,
        disk_free_bytes=_disk_free_bytes(output_dir),
        cpu_gflops_fp32=measure_cpu_gflops(),
        capabilities=detect_capabilities(gpu_tuple),
        torch_version=torch_version,
        cuda_version=cuda_version if gpu_tuple else "",
        profiled_s=round(time.perf_counter() - started, 2),
    )
    try:
        cache_path.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(profile.to_dict(), indent=2))
    except OSError:
        pass  # a read-only home still gets a profile, just not a cached one
    report("done", 1.0)
    return profile


def _fake_capabilities(has_gpu: bool) -> tuple[Capability, ...]:
    capabilities = []
    for capability in detect_capabilities(()):
        if has_gpu:
            available = capability.name in ("bf16", "sdpa-flash", "triton")
            detail = {
                "bf16": "compute capability 9.x",
                "sdpa-flash": "torch SDPA flash backend (Ampere or newer)",
                "triton": "triton kernels",
            }.get(capability.name, "not installed")
            capability = dataclasses.replace(capability, available=available, detail=detail)
        capabilities.append(capability)
    return tuple(capabilities)


def fake_profile(kind: str = "h100") -> HardwareProfile:
    """Fixed profiles for snapshot tests and demos: "h100", "h200" or "cpu". Numbers are typical measured values."""
    cpu_fields = dict(
        cpu_name="AMD EPYC 9654 96-Core Processor",
        cpu_cores=16,
        ram_total_bytes=128 * GIB,
        ram_available_bytes=120 * GIB,
        disk_free_bytes=500 * GIB,
        cpu_gflops_fp32=900.0,
        torch_version="2.11.0+cu130",
        profiled_s=14.2,
    )
    if kind in ("h100", "h200"):
        h200 = kind == "h200"
        gpu = GpuInfo(
            index=0,
            name="NVIDIA H200" if h200 else "NVIDIA H100 80GB HBM3",
            uuid="GPU-00000000-0000-0000-0000-000000000000",
            architecture="Hopper",
            compute_capability=(9, 0),
            total_bytes=143771 * MIB if h200 else 81559 * MIB,
            free_bytes=143210 * MIB if h200 else 81000 * MIB,
            usable_bytes=142500 * MIB if h200 else 80300 * MIB,
            tflops_bf16=760.0 if h200 else 740.0,
            tflops_fp16=765.0 if h200 else 745.0,
            tflops_fp32=51.0,
            bandwidth_bytes_per_s=4.3e12 if h200 else 3.0e12,
            driver="580.159.04",
        )
        return HardwareProfile(gpus=(gpu,), capabilities=_fake_capabilities(True), cuda_version="13.0", **cpu_fields)
    if kind == "cpu":
        return HardwareProfile(
            gpus=(),
            cpu_name="Intel(R) Xeon(R) CPU @ 2.20GHz",
            cpu_cores=2,
            ram_total_bytes=8 * GIB,
            ram_available_bytes=6 * GIB,
            disk_free_bytes=40 * GIB,
            cpu_gflops_fp32=60.0,
            capabilities=_fake_capabilities(False),
            torch_version="2.13.0+cpu",
            cuda_version="",
            profiled_s=0.6,
        )
    raise ValueError(f"no fake profile {kind!r}: use 'h100', 'h200' or 'cpu'")


PLANNING_PROFILE_FILE = "hardware.json"


def save_planning_profile(profile: HardwareProfile, run_dir: str | os.PathLike) -> None:
    """Keep the profile a run's pre-flight planned with in RUN_DIR, for its training child (and the probe's) to plan with."""
    path = Path(run_dir) / PLANNING_PROFILE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=1), encoding="utf-8")


def discard_planning_profile(run_dir: str | os.PathLike) -> None:
    (Path(run_dir) / PLANNING_PROFILE_FILE).unlink(missing_ok=True)


def _measure_gpus(devices: tuple[nvml.NvmlDevice, ...], report: ProgressCallback) -> list[GpuInfo]:
    import torch

    count = torch.cuda.device_count()
    by_index = {device.index: device for device in devices}
    gpus = []
    for index in range(count):
        base = 0.05 + 0.8 * index / count

        def stage(text: str, base=base) -> None:
            report(text, base)

        try:
            gpus.append(_measure_gpu(torch, by_index.get(index), index, stage))
        except Exception as error:  # a broken GPU is left out, not fatal
            report(f"GPU {index} skipped: {error}", base)
    return gpus


def _measure_gpus_in_child(report: ProgressCallback) -> list[GpuInfo]:
    """The GPUs measured in a child process. The CUDA context the measurement opens (0.5 GiB on an H200) cannot be
    closed and would stay on the GPU beside the training for as long as the CLI or the wizard runs; it ends with the
    child. If the child fails the measurement runs here instead, rather than profiling a GPU machine as a CPU one."""
    import subprocess
    import sys
    import tempfile

    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))}
    gpus: list[GpuInfo] = []
    with tempfile.TemporaryFile(mode="w+") as errors:
        child = None
        try:
            child = subprocess.Popen([sys.executable, "-m", "elite_core.hardware", "--measure-gpus"], env=env,
                                     stdout=subprocess.PIPE, stderr=errors, text=True)
            for line in child.stdout:
                message = json.loads(line)
                if "gpu" in message:
                    gpus.append(_gpu_from_dict(message["gpu"]))
                else:
                    report(message["stage"], message["fraction"])
            returncode = child.wait()
        except (OSError, ValueError, KeyError, TypeError) as error:
            returncode = -1
            errors.write(f"\n{type(error).__name__}: {error}")
        finally:
            if child is not None and child.poll() is None:  # not read to its end: it must not measure beside us
                child.kill()
                child.wait()
        if returncode == 0:
            return gpus
        errors.seek(0)
        last = (errors.read().strip().splitlines() or ["no output"])[-1]
    report(f"GPU measurement in a child process failed ({last}); measuring here", 0.05)
    return _measure_gpus(nvml.devices(), report)


def _gpu_from_dict(data: dict[str, Any]) -> GpuInfo:
    return GpuInfo(**{**data, "compute_capability": tuple(data["compute_capability"])})


def _measure_gpus_child_main() -> int:
    """`python -m elite_core.hardware --measure-gpus`: one JSON line per progress stage, then one per GPU."""

    def report(stage: str, fraction: float) -> None:
        print(json.dumps({"stage": stage, "fraction": fraction}), flush=True)

    for gpu in _measure_gpus(nvml.devices(), report):
        print(json.dumps({"gpu": dataclasses.asdict(gpu)}), flush=True)
    return 0


def planning_profile(run_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> HardwareProfile:
    """The profile a run plans with: RUN_DIR/hardware.json when it was taken on this machine, else this machine's
    profile now, kept there. Planned again from today's free memory, the probe, the run and its resumes could each
    choose other engine options (other layers, QLoRA as a fallback) than the pre-flight confirmed."""
    path = Path(run_dir) / PLANNING_PROFILE_FILE
    try:
        saved = HardwareProfile.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError):
        saved = None
    if saved is not None and _same_machine(saved, nvml.devices()):
        return saved
    profile = profile_hardware(output_dir)
    save_planning_profile(profile, run_dir)
    return profile


def _same_machine(profile: HardwareProfile, devices: tuple[nvml.NvmlDevice, ...]) -> bool:
    if profile.gpus or devices:
        return sorted(gpu.uuid for gpu in profile.gpus) == sorted(device.uuid for device in devices)
    return profile.cpu_name == _cpu_name() and profile.cpu_cores == _cpu_cores()


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--measure-gpus"]:
        sys.exit("usage: python -m elite_core.hardware --measure-gpus")
    sys.exit(_measure_gpus_child_main())
