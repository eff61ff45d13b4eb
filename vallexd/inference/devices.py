"""Choose the device and dtype, prove they work before the model is placed, and describe them.

`open_device(device, dtype)` is what `Engine.load` calls:

1. `resolve_device`: `auto` takes GPU 0 when torch can use it *and* this torch build has kernels for
   its compute capability (else MPS, else the CPU, logging why when `/dev/nvidia0` exists);
   `cuda[:N]` and `mps` are refused with a clear message when absent or unsupported.
2. `resolve_dtype`: float32 everywhere; float16 on CUDA; bfloat16 on CUDA with capability >= 8.0
   and on CPUs with native bfloat16 arithmetic (AVX512_BF16 or AMX-BF16).  Half types on MPS are
   refused (never verified there), float16 on the CPU too (no native arithmetic: slow and lossy).
3. `torch.cuda.set_device` for `cuda:N` (the model thread's current device: kernels, generators
   and the caching allocator follow it), then `probe`: one tiny kernel in the chosen dtype whose
   result is read back, so "no kernel image", a broken driver or a bad dtype fail at load, not in
   the first request.

`describe(device)` is the static part of `status`'s `device_info`; `memory_now` the live part.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vallexd.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
BF16_MIN_CAPABILITY = (8, 0)  # Ampere: native bfloat16 tensor-core math
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 dot products
CPUINFO = Path("/proc/cpuinfo")
NVIDIA_DEVICE = Path("/dev/nvidia0")
NVIDIA_UVM = Path("/dev/nvidia-uvm")
NVIDIA_DRIVER_VERSION = Path("/proc/driver/nvidia/version")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------- the host
def cpuinfo_field(name: str, cpuinfo: str | Path | None = None) -> str:
    try:
        text = Path(cpuinfo or CPUINFO).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    m = re.search(rf"^{name}\s*:\s*(.*)$", text, flags=re.M)
    return m.group(1).strip() if m else ""


def cpu_flags(cpuinfo: str | Path | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    return frozenset(cpuinfo_field("flags", cpuinfo).split())


def cpu_has_native_bf16(cpuinfo: str | Path | None = None) -> bool:
    """True when the CPU computes bfloat16 natively (AVX512_BF16 or AMX), not by emulation."""
    return any(flag in cpu_flags(cpuinfo) for flag in CPU_BF16_FLAGS)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def nvidia_driver_version() -> str | None:
    """The kernel module's version ("580.65.06"), from /proc/driver/nvidia/version; None without one."""
    try:
        text = NVIDIA_DRIVER_VERSION.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    return m.group(1) if m else None


def driver_cuda_version() -> str | None:
    """The newest CUDA version the installed driver supports ("13.0"), via libcuda; None without one."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


# ------------------------------------------------------------------------------------ CUDA support
def arch_supports(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a build with kernels for `arch_list` (torch.cuda.get_arch_list()) runs on `capability`.

    `sm_XY` machine code runs on the same major version at minor >= Y ("sm_80" serves 8.0, 8.6 and
    8.9); arch-specific `sm_XYa` only on exactly X.Y; `compute_XY` (PTX) is compiled by the driver
    for any capability >= X.Y.
    """
    major, minor = capability
    cc = 10 * major + minor
    for arch in arch_list:
        m = re.fullmatch(r"(sm|compute)_(\d+)([af]?)", arch.strip())
        if m is None:
            continue
        code = int(m.group(2))
        code_major, code_minor = divmod(code, 10)
        if m.group(1) == "compute":
            if cc >= code:
                return True
        elif m.group(3) == "a":
            if cc == code:
                return True
        elif code_major == major and minor >= code_minor:
            return True
    return False


def cuda_unsupported_reason(index: int) -> str | None:
    """Why GPU `index` cannot run this torch build's kernels, or None when it can (or cannot tell)."""
    archs = torch.cuda.get_arch_list()
    if not archs:
        return None  # no list to compare with: the probe kernel decides
    capability = tuple(torch.cuda.get_device_capability(index))
    if arch_supports((int(capability[0]), int(capability[1])), archs):
        return None
    return (
        f"GPU {index} ({torch.cuda.get_device_name(index)}) has CUDA capability "
        f"{capability[0]}.{capability[1]}, but this torch build ({torch.__version__}, CUDA "
        f"{torch.version.cuda}) has kernels only for {' '.join(archs)}; use --device cpu, or a torch "
        f"build for this GPU (README: GPUs and torch builds)"
    )


def why_no_cuda() -> str:
    """Why torch cannot use CUDA here, in words (for the log and for a refused `cuda`)."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    if NVIDIA_DEVICE.exists() and not NVIDIA_UVM.exists():
        return "/dev/nvidia-uvm does not exist: run `nvidia-modprobe -u -c0` as root (the systemd unit does)"
    try:
        torch.cuda.init()  # raises the driver's own explanation, e.g. "driver too old (found 12040)"
    except Exception as exc:
        reason = _first_line(exc)
        supported = driver_cuda_version()
        if supported is not None:
            reason += f" (the driver supports CUDA {supported}; this torch needs CUDA {torch.version.cuda})"
        return reason
    return "torch.cuda.is_available() is False"


# ------------------------------------------------------------------------------------- resolution
def resolve_device(name: str) -> torch.device:
    """Configured name -> torch.device; `cuda` means `cuda:0`.  Absent or unsupported is an error.

    Raises InvalidArgument(BAD_DEVICE) for an unknown name, Unavailable(DEVICE_UNAVAILABLE) for an
    absent device, Unavailable(DEVICE_UNSUPPORTED) for a GPU this torch build has no kernels for.
    """
    name = str(name).strip().lower()
    if name == "auto":
        return _auto_device()
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m:
        if not torch.cuda.is_available():
            raise Unavailable(f"device {name!r} requested but CUDA is not usable: {why_no_cuda()}",
                              reason="DEVICE_UNAVAILABLE")
        index = int(m.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise Unavailable(f"device {name!r} requested but only {count} CUDA device(s) exist",
                              reason="DEVICE_UNAVAILABLE")
        reason = cuda_unsupported_reason(index)
        if reason is not None:
            raise Unavailable(reason, reason="DEVICE_UNSUPPORTED")
        return torch.device("cuda", index)
    if name == "mps":
        if not _mps_available():
            raise Unavailable("device 'mps' requested but MPS is not available", reason="DEVICE_UNAVAILABLE")
        return torch.device("mps")
    raise InvalidArgument(f"unknown device {name!r}; use one of {', '.join(DEVICE_NAMES)}",
                          reason="BAD_DEVICE")


def _auto_device() -> torch.device:
    """GPU 0 if usable, else MPS, else the CPU; says why in the log when a GPU seems present."""
    if torch.cuda.is_available():
        reason = cuda_unsupported_reason(0)
        if reason is None:
            return torch.device("cuda", 0)
        log.warning("device auto: not using the GPU: %s", reason)
    elif NVIDIA_DEVICE.exists():
        log.warning("device auto: %s exists but CUDA is not usable: %s; using the CPU", NVIDIA_DEVICE,
                    why_no_cuda())
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> float32 everywhere; half types only where the device computes them natively.

    float32 is the default because it is what the reference computes (the compatibility contract
    is "the same codes").  Raises InvalidArgument(BAD_DTYPE) naming what the device lacks.
    """
    name = str(name).strip().lower()
    if name == "auto":
        return torch.float32
    if name not in DTYPES:
        raise InvalidArgument(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}", reason="BAD_DTYPE")
    dtype = DTYPES[name]
    if dtype == torch.float32:
        return dtype
    if device.type == "cuda":
        if dtype == torch.bfloat16:
            major, minor = torch.cuda.get_device_capability(device)
            if (major, minor) < BF16_MIN_CAPABILITY:
                raise InvalidArgument(
                    f"bfloat16 needs CUDA capability {BF16_MIN_CAPABILITY[0]}.{BF16_MIN_CAPABILITY[1]} or "
                    f"newer; {device} has {major}.{minor}: use float16 or float32", reason="BAD_DTYPE")
        return dtype
    if device.type == "cpu":
        if dtype == torch.float16:
            raise InvalidArgument("float16 is not supported on the CPU (no native half arithmetic); use "
                                  "float32, or bfloat16 on a CPU with AVX512_BF16 or AMX", reason="BAD_DTYPE")
        if not cpu_has_native_bf16():
            raise InvalidArgument(
                f"bfloat16 on the CPU needs native bfloat16 arithmetic ({' or '.join(CPU_BF16_FLAGS)} in "
                f"/proc/cpuinfo); this CPU has neither: use float32", reason="BAD_DTYPE")
        return dtype
    raise InvalidArgument(f"dtype {name} is not supported on {device.type}; use float32", reason="BAD_DTYPE")


def probe(device: torch.device, dtype: torch.dtype) -> None:
    """Run one tiny matmul + softmax in `dtype` on `device` and read it back (synchronising).

    Raises Unavailable(DEVICE_FAILED) with torch's message when the device cannot compute.
    """
    try:
        a = torch.arange(1, 5, dtype=torch.float32, device=device).view(2, 2).to(dtype)
        product = (a @ a).float()  # [[7, 10], [15, 22]]: exact in every dtype here
        weights = torch.softmax(product, dim=-1)
        got = float(product.sum()), float(weights.sum())  # host reads surface asynchronous errors
    except Exception as exc:
        raise Unavailable(f"device {device} cannot compute in {dtype_name(dtype)}: {_first_line(exc)}",
                          reason="DEVICE_FAILED") from None
    if got[0] != 54.0 or abs(got[1] - 2.0) > 1e-3:
        raise Unavailable(f"device {device} computed a wrong result in {dtype_name(dtype)}: {got}",
                          reason="DEVICE_FAILED")


def open_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Resolve both names, make a CUDA device current for this thread, and probe it (see module doc)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # cuda:N: kernels launched without an index go to N, not 0
    probe(dev, dt)
    return dev, dt


# -------------------------------------------------------------------------------------- describing
def describe(device: torch.device) -> dict[str, Any]:
    """What `status` shows about the device: name, capability, memory, driver, torch build."""
    info: dict[str, Any] = {"device": str(device), "type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        index = device.index or 0
        props = torch.cuda.get_device_properties(index)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_total_bytes=int(props.total_memory),
            driver=nvidia_driver_version(),
            driver_cuda=driver_cuda_version(),
            cuda_runtime=torch.version.cuda,
            arch_list=list(torch.cuda.get_arch_list()),
        )
    elif device.type == "cpu":
        info.update(
            name=cpuinfo_field("model name") or None,
            capability=torch.backends.cpu.get_cpu_capability(),
            native_bf16=cpu_has_native_bf16(),
        )
    else:
        info.update(name=device.type)
    return info


def memory_now(device: torch.device) -> dict[str, int]:
    """The caching allocator's live figures for a CUDA device (no driver call); {} elsewhere."""
    if device.type != "cuda":
        return {}
    return {
        "memory_allocated_bytes": int(torch.cuda.memory_allocated(device)),
        "memory_reserved_bytes": int(torch.cuda.memory_reserved(device)),
        "memory_peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
    }
