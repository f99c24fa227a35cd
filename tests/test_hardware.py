"""The hardware profile on this (CPU-only) machine, its cache, and the fixed fake profiles the UI tests use."""

import json
import time

import pytest

from elite_core import nvml
from elite_core.hardware import (
    Capability,
    HardwareProfile,
    architecture_name,
    fake_profile,
    profile_hardware,
)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda_available(), reason="checks the CPU-only profile")
def test_cpu_only_profile_is_clean_fast_and_cached(tmp_path):
    stages = []
    started = time.perf_counter()
    profile = profile_hardware(tmp_path / "runs", use_cache=False, cache_dir=tmp_path / "cache",
                               progress=lambda text, fraction: stages.append((text, fraction)))
    assert time.perf_counter() - started < 3.0
    assert profile.gpus == () and not profile.has_gpu and profile.device == "cpu"
    assert profile.cpu_cores >= 1 and profile.cpu_gflops_fp32 > 0
    assert 0 < profile.ram_available_bytes <= profile.ram_total_bytes
    assert profile.memory_budget_bytes == profile.ram_available_bytes
    assert profile.disk_free_bytes > 0  # measured on the nearest existing parent of a directory not yet made
    assert not profile.can("bf16") and not profile.can("bitsandbytes")
    assert all(c.fallback for c in profile.capabilities)
    assert stages[-1][1] == 1.0 and all(0.0 <= f <= 1.0 for _, f in stages)
    assert list((tmp_path / "cache").glob("hardware-*.json"))

    again = profile_hardware(tmp_path / "runs", cache_dir=tmp_path / "cache")
    assert again.from_cache and again.profiled_s == 0.0
    assert again.cpu_gflops_fp32 == profile.cpu_gflops_fp32
    fresh = profile_hardware(tmp_path / "runs", use_cache=False, cache_dir=tmp_path / "cache")
    assert not fresh.from_cache


def test_broken_cache_file_is_ignored(tmp_path):
    profile_hardware(use_cache=False, cache_dir=tmp_path)
    for path in tmp_path.glob("hardware-*.json"):
        path.write_text("{not json")
    assert not profile_hardware(cache_dir=tmp_path).from_cache


def test_nvml_without_driver_reports_nothing_and_raises_nothing():
    if nvml.available():
        pytest.skip("this machine has an NVIDIA driver")
    assert nvml.devices() == () and nvml.device_count() == 0
    assert nvml.memory(0) is None and nvml.process_used_bytes(1, 0) is None


@pytest.mark.parametrize("kind", ["h100", "h200", "cpu"])
def test_fake_profiles_round_trip_through_json(kind):
    profile = fake_profile(kind)
    assert profile == fake_profile(kind)  # deterministic for snapshot tests
    data = json.loads(json.dumps(profile.to_dict()))
    assert HardwareProfile.from_dict(data) == profile


def test_fake_profile_properties():
    h100 = fake_profile("h100")
    assert h100.has_gpu and h100.device == "cuda"
    assert h100.memory_budget_bytes == h100.gpus[0].usable_bytes
    assert h100.gpus[0].architecture == "Hopper" and h100.can("bf16")
    cpu = fake_profile("cpu")
    assert cpu.device == "cpu" and cpu.memory_budget_bytes == cpu.ram_available_bytes
    assert isinstance(cpu.capability("bitsandbytes"), Capability)
    with pytest.raises(ValueError):
        fake_profile("tpu")


def test_architecture_names():
    assert architecture_name((7, 5)) == "Turing"
    assert architecture_name((8, 0)) == "Ampere"
    assert architecture_name((8, 6)) == "Ampere"
    assert architecture_name((8, 9)) == "Ada"
    assert architecture_name((9, 0)) == "Hopper"
    assert architecture_name((10, 0)) == "Blackwell"
    assert architecture_name((12, 0)) == "Blackwell"


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
def test_gpu_profile_measures_within_limits(tmp_path):
    started = time.perf_counter()
    profile = profile_hardware(use_cache=False, cache_dir=tmp_path)
    assert time.perf_counter() - started < 20.0
    gpu = profile.gpus[0]
    assert 0 < gpu.usable_bytes <= gpu.total_bytes
    assert gpu.tflops_fp16 > 10 and gpu.bandwidth_bytes_per_s > 1e11
    import torch

    # Measured in a child: no CUDA context of this process stays on the GPU beside the training.
    assert not torch.cuda.is_initialized()


def test_the_gpu_measurement_child_speaks_json_lines_and_a_failed_one_falls_back_to_measuring_here(monkeypatch, tmp_path):
    import json
    import subprocess
    import sys
    import time

    from elite_core import hardware

    child = subprocess.run([sys.executable, "-m", "elite_core.hardware", "--measure-gpus"], capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    messages = [json.loads(line) for line in child.stdout.splitlines()]
    assert all("gpu" in message or {"stage", "fraction"} <= set(message) for message in messages)
    gpus = [message["gpu"] for message in messages if "gpu" in message]
    assert [gpu.uuid for gpu in hardware._measure_gpus_in_child(lambda stage, fraction: None)] == [
        gpu["uuid"] for gpu in gpus]

    stages = []
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    measured_here = hardware._measure_gpus_in_child(lambda stage, fraction: stages.append(stage))
    assert "failed" in stages[0] and "measuring here" in stages[0]
    assert [gpu.uuid for gpu in measured_here] == [gpu["uuid"] for gpu in gpus]

    # A child that prints something else is not left measuring beside this process: it is killed, not waited for.
    garbled = tmp_path / "garbled-python"
    garbled.write_text("#!/bin/sh\necho 'not json'\nsleep 60\n")
    garbled.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(garbled))
    stages.clear()
    started = time.monotonic()
    hardware._measure_gpus_in_child(lambda stage, fraction: stages.append(stage))
    assert time.monotonic() - started < 30
    assert "JSONDecodeError" in stages[0] and "measuring here" in stages[0]


def test_a_cached_profile_sees_the_libraries_installed_since(tmp_path, monkeypatch):
    from elite_core.hardware import _refresh_volatile

    cached = fake_profile("h100")  # profiled before bitsandbytes was installed
    assert not cached.can("bitsandbytes")
    assert not _refresh_volatile(cached, (), tmp_path).can("bitsandbytes")  # not installed on this machine either
    package = tmp_path / "site" / "bitsandbytes"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    refreshed = _refresh_volatile(cached, (), tmp_path)
    assert refreshed.can("bitsandbytes") and refreshed.from_cache
    assert refreshed.gpus == cached.gpus


def test_a_cached_profile_budget_follows_the_free_memory_both_ways(tmp_path):
    """Profiled beside another job holding 40 GiB, the budget must grow back once it is gone (it only ever shrank),
    and shrink when another process takes memory."""
    import dataclasses

    from elite_core.hardware import _refresh_volatile
    from elite_core.nvml import NvmlDevice

    gib = 1024**3
    gpu = fake_profile("h100").gpus[0]
    busy = dataclasses.replace(gpu, free_bytes=39 * gib, usable_bytes=38 * gib)
    cached = dataclasses.replace(fake_profile("h100"), gpus=(busy,))

    def now(free):
        return (NvmlDevice(index=0, name=gpu.name, uuid=gpu.uuid, compute_capability=(9, 0), total_bytes=gpu.total_bytes,
                           free_bytes=free, used_bytes=gpu.total_bytes - free, driver="", cuda_driver_version="",
                           memory_bus_width_bits=0, max_memory_clock_mhz=0),)

    assert _refresh_volatile(cached, now(79 * gib), tmp_path).gpus[0].usable_bytes == 78 * gib
    assert _refresh_volatile(cached, now(19 * gib), tmp_path).gpus[0].usable_bytes == 18 * gib
