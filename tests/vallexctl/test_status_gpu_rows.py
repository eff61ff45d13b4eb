"""`vallexctl status` shows the GPU (name, capability, memory, driver) from status's device_info."""

from __future__ import annotations

from vallexctl.cli import _gpu_rows


def test_gpu_rows_for_cuda_only() -> None:
    info = {"type": "cuda", "device": "cuda:0", "name": "NVIDIA H200", "capability": "9.0",
            "memory_total_bytes": 150 * 2**30, "memory_reserved_bytes": 3 * 2**30,
            "driver": "580.65.06", "driver_cuda": "13.0", "cuda_runtime": "13.0"}
    rows = dict(_gpu_rows(info))
    assert rows["gpu"] == "NVIDIA H200 (capability 9.0)"
    assert rows["gpu memory"].startswith("3.0 GiB reserved of 150")
    assert rows["gpu driver"] == "580.65.06 (CUDA 13.0; torch CUDA 13.0)"
    assert _gpu_rows({"type": "cpu", "name": "AMD EPYC"}) == []
    assert _gpu_rows(None) == []  # an older daemon, or the model not loaded yet
