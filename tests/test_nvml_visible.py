"""CUDA_VISIBLE_DEVICES: torch's cuda:N is the N-th visible GPU, and NVML must report that GPU, not its own GPU N. No
GPU here: a stand-in for the pynvml module with two GPUs of different free memory (the library itself needs a driver)."""

from __future__ import annotations

import sys
import types

import pytest

from elite_core import nvml

GIB = 1024**3


@pytest.fixture
def two_gpus(monkeypatch):
    free = {0: 79 * GIB, 1: 39 * GIB}
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetUUID=lambda handle: f"GPU-{'aaaa' if handle == 0 else 'bbbb'}-1111",
        nvmlDeviceGetName=lambda handle: f"H100 #{handle}",
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(total=80 * GIB, free=free[handle],
                                                                     used=80 * GIB - free[handle]),
        nvmlDeviceGetCudaComputeCapability=lambda handle: (9, 0),
        nvmlSystemGetDriverVersion=lambda: "580",
        nvmlSystemGetCudaDriverVersion=lambda: 13000,
        nvmlDeviceGetMemoryBusWidth=lambda handle: 5120,
        nvmlDeviceGetMaxClockInfo=lambda handle, kind: 2619,
        nvmlDeviceGetComputeRunningProcesses=lambda handle: [],
        NVML_CLOCK_MEM=2,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(nvml, "_initialised", None)
    monkeypatch.setattr(nvml, "_visible_cache", {})
    monkeypatch.setattr(nvml, "_snapshot_cache", {})


@pytest.mark.parametrize("visible, expected", [
    (None, ["GPU-aaaa-1111", "GPU-bbbb-1111"]),
    ("1", ["GPU-bbbb-1111"]),
    ("GPU-bbbb", ["GPU-bbbb-1111"]),
    ("1,0", ["GPU-bbbb-1111", "GPU-aaaa-1111"]),
    ("0,7,1", ["GPU-aaaa-1111"]),  # CUDA stops at the first entry that names no GPU
    ("", []),
])
def test_cuda_index_n_is_the_nth_visible_gpu(two_gpus, monkeypatch, visible, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    devices = nvml.devices()
    assert [device.uuid for device in devices] == expected
    assert [device.index for device in devices] == list(range(len(expected)))
    if expected:
        # cuda:0's free memory is that GPU's, which the budget is made of
        assert nvml.memory_now(0).free_bytes == (79 if expected[0].startswith("GPU-aaaa") else 39) * GIB
