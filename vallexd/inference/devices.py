"""Resolve the configured device and dtype names to torch objects, with clear errors at load time."""

from __future__ import annotations

import re

import torch

from vallexd.errors import InvalidArgument, Unavailable

DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else mps if available, else cpu.  An absent device is an error."""
    name = str(name).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m:
        if not torch.cuda.is_available():
            raise Unavailable(
                f"device {name!r} requested but CUDA is not available", reason="DEVICE_UNAVAILABLE"
            )
        index = int(m.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise Unavailable(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist",
                reason="DEVICE_UNAVAILABLE",
            )
        return torch.device("cuda", index)
    if name == "mps":
        if not _mps_available():
            raise Unavailable("device 'mps' requested but MPS is not available", reason="DEVICE_UNAVAILABLE")
        return torch.device("mps")
    raise InvalidArgument(
        f"unknown device {name!r}; use one of {', '.join(DEVICE_NAMES)}", reason="BAD_DEVICE"
    )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> float32 everywhere; float16/bfloat16 are opt-in on CUDA (refused on the CPU: slow, lossy).

    float32 is the default because it is what the reference computes (the compatibility contract is
    "the same codes"), and a 12-layer pre-norm residual stream can overflow in float16.
    """
    name = str(name).strip().lower()
    if name == "auto":
        return torch.float32
    if name not in DTYPES:
        raise InvalidArgument(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}", reason="BAD_DTYPE")
    dtype = DTYPES[name]
    native = dtype == torch.bfloat16 and cpu_has_native_bf16()
    if device.type == "cpu" and dtype != torch.float32 and not native:
        raise InvalidArgument(
            f"dtype {name} is not supported on this CPU (bfloat16 needs avx512_bf16 or amx_bf16; "
            "emulated it is slow); use float32", reason="BAD_DTYPE")
    return dtype


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bfloat16 natively (avx512_bf16 or amx_bf16 in its flags)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[-1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
