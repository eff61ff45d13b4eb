"""Device and dtype choice on a machine without a GPU.

CUDA is faked through torch.cuda's own query functions (is_available, device_count,
get_device_capability, get_device_name, get_arch_list, get_device_properties): the clear interface
devices.py reads.  Nothing here launches a CUDA kernel.  The CPU paths are real.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from vallexd.errors import InvalidArgument, Unavailable
from vallexd.inference import devices
from vallexd.inference.devices import (
    arch_supports,
    describe,
    open_device,
    probe,
    resolve_device,
    resolve_dtype,
)

# torch 2.11's CUDA 13 wheel (what pyproject pins): Turing and newer, plus PTX for the future.
ARCHS_211 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


def fake_cuda(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], *, count: int = 1,
              name: str = "NVIDIA Fake", archs: list[str] = ARCHS_211) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
    props = SimpleNamespace(name=name, major=capability[0], minor=capability[1], total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def test_arch_list_compatibility_rules() -> None:
    supported = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (12, 1), (13, 0)]
    for cap in supported:
        assert arch_supports(cap, ARCHS_211), cap
    for cap in [(6, 0), (6, 1), (7, 0), (7, 2)]:  # Pascal, Volta, Xavier: "available" but no kernels
        assert not arch_supports(cap, ARCHS_211), cap
    assert not arch_supports((13, 0), ["sm_75", "sm_120"])  # machine code never crosses a major version
    assert arch_supports((9, 0), ["sm_90a"]) and not arch_supports((10, 0), ["sm_90a"])
    assert not arch_supports((8, 0), ["sm_86"])  # nor runs on a lower minor


def test_gpu_outside_the_arch_list_is_refused_clearly(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    fake_cuda(monkeypatch, (6, 1), name="Tesla P40")
    with pytest.raises(Unavailable) as info:
        resolve_device("cuda")
    err = info.value
    assert err.reason == "DEVICE_UNSUPPORTED"
    for part in ("Tesla P40", "capability 6.1", "sm_75", "--device cpu", torch.__version__):
        assert part in err.message, part
    # auto does not pick it, and says why.
    with caplog.at_level(logging.WARNING, logger="vallexd.inference.devices"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "not using the GPU" in caplog.text and "capability 6.1" in caplog.text


def test_supported_gpu_is_cuda_index(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, (8, 6), count=2)
    assert str(resolve_device("auto")) == "cuda:0"
    assert str(resolve_device("cuda")) == "cuda:0"  # reported with its index
    assert str(resolve_device("CUDA:1")) == "cuda:1"
    with pytest.raises(Unavailable) as info:
        resolve_device("cuda:2")
    assert info.value.reason == "DEVICE_UNAVAILABLE" and "2 CUDA device(s)" in info.value.message
    with pytest.raises(InvalidArgument):
        resolve_device("tpu")


def test_open_device_makes_cuda_n_current_before_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, (9, 0), count=2)
    calls: list[Any] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(devices, "probe", lambda d, dt: calls.append(("probe", str(d), dt)))
    assert open_device("cuda:1", "bfloat16") == (torch.device("cuda", 1), torch.bfloat16)
    assert calls == [("set_device", "cuda:1"), ("probe", "cuda:1", torch.bfloat16)]


def test_dtype_gates_per_device_and_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, (7, 5))  # Turing: float16 yes, bfloat16 no
    cuda = torch.device("cuda", 0)
    assert resolve_dtype("auto", cuda) == torch.float32
    assert resolve_dtype("float16", cuda) == torch.float16
    with pytest.raises(InvalidArgument) as info:
        resolve_dtype("bfloat16", cuda)
    assert info.value.reason == "BAD_DTYPE" and "8.0" in info.value.message and "7.5" in info.value.message
    fake_cuda(monkeypatch, (8, 0))
    assert resolve_dtype("bfloat16", cuda) == torch.bfloat16
    mps = torch.device("mps")
    assert resolve_dtype("float32", mps) == torch.float32
    for half in ("float16", "bfloat16"):
        with pytest.raises(InvalidArgument, match="not supported on mps"):
            resolve_dtype(half, mps)
    with pytest.raises(InvalidArgument, match="unknown dtype"):
        resolve_dtype("float8", cuda)


def test_cpu_bfloat16_only_where_native(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    with pytest.raises(InvalidArgument, match="float16 is not supported on the CPU"):
        resolve_dtype("float16", cpu)
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(devices, "CPUINFO", info)
    info.write_text("processor\t: 0\nmodel name\t: Old Xeon\nflags\t\t: fpu sse2 avx2 avx512f\n\n")
    with pytest.raises(InvalidArgument) as err:
        resolve_dtype("bfloat16", cpu)
    assert "avx512_bf16 or amx_bf16" in err.value.message
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    info.unlink()  # no /proc/cpuinfo (macOS): not native as far as we can tell
    with pytest.raises(InvalidArgument):
        resolve_dtype("bfloat16", cpu)


def test_this_machine_accepts_cpu_bfloat16_and_probes_it() -> None:
    """The project's machines (AMD EPYC with AVX512_BF16) run the CPU in bfloat16; others refuse."""
    if not devices.cpu_has_native_bf16():
        pytest.skip("this CPU has no avx512_bf16/amx_bf16 flag")
    assert open_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert describe(torch.device("cpu"))["native_bf16"] is True


def test_probe_reports_a_device_that_cannot_compute() -> None:
    probe(torch.device("cpu"), torch.float32)
    with pytest.raises(Unavailable) as info:  # meta tensors have no data to read back
        probe(torch.device("meta"), torch.float32)
    assert info.value.reason == "DEVICE_FAILED" and "meta" in info.value.message


def test_auto_says_why_it_took_the_cpu_when_a_gpu_node_exists(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node, uvm = tmp_path / "nvidia0", tmp_path / "nvidia-uvm"
    node.touch()
    monkeypatch.setattr(devices, "NVIDIA_DEVICE", node)
    monkeypatch.setattr(devices, "NVIDIA_UVM", uvm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def auto_log() -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vallexd.inference.devices"):
            assert resolve_device("auto") == torch.device("cpu")
        return caplog.text

    # The CPU-only torch build (README: install the CPU build) imports and runs; auto says why.
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "has no CUDA support" in auto_log()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert "nvidia-modprobe -u -c0" in auto_log()  # the sandbox could not create /dev/nvidia-uvm
    uvm.touch()

    def old_driver() -> None:
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12040).")

    monkeypatch.setattr(torch.cuda, "init", old_driver)
    assert "too old (found version 12040)" in auto_log()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES" in auto_log()
    # An explicit request gets the same explanation as an error.
    with pytest.raises(Unavailable, match="CUDA_VISIBLE_DEVICES") as info:
        resolve_device("cuda")
    assert info.value.reason == "DEVICE_UNAVAILABLE"
    node.unlink()  # no GPU node at all: a CPU machine, nothing to explain
    assert auto_log() == ""


def test_describe_cuda_for_status(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_cuda(monkeypatch, (9, 0), name="NVIDIA H200")
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n"
                       "GCC version:  gcc version 12.2.0\n")
    monkeypatch.setattr(devices, "NVIDIA_DRIVER_VERSION", version)
    info = describe(torch.device("cuda", 0))
    assert info["device"] == "cuda:0" and info["name"] == "NVIDIA H200" and info["capability"] == "9.0"
    assert info["memory_total_bytes"] == 80 * 2**30 and info["driver"] == "580.65.06"
    assert info["arch_list"] == ARCHS_211 and info["cuda_runtime"] == torch.version.cuda
    cpu = describe(torch.device("cpu"))
    assert cpu["type"] == "cpu" and cpu["capability"] == torch.backends.cpu.get_cpu_capability()


def test_engine_reports_device_info_and_validates_on_the_host(tiny_models: Any) -> None:
    from torch.overrides import TorchFunctionMode

    from vallexd.inference.engine import Engine
    from vallexd.types import Sampling

    engine = Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cpu", dtype="float32")
    info = engine.device_info
    assert info["device"] == "cpu" and info["vocoder_device"] == "cpu" and info["torch"] == torch.__version__

    class Count(TorchFunctionMode):
        made = 0

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func in (torch.tensor, torch.as_tensor, torch.zeros, torch.empty, torch.full):
                Count.made += 1
            return func(*args, **(kwargs or {}))

    # A bad last piece is refused before any tensor is built for the good ones.
    with Count(), pytest.raises(InvalidArgument):
        engine.synthesize([([20, 21], "en"), ([22], "en"), ([10**6], "en")], None, Sampling(top_k=1))
    assert Count.made == 0
    audio = engine.synthesize([([20, 21], "en")], None, Sampling(top_k=1))
    assert audio.dtype == np.float32 and audio.size > 0
