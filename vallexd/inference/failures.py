"""What a torch exception raised during synthesis means for the request and for the daemon.

The one place that maps engine failures (the worker calls it from its except path):

- out of memory (`torch.OutOfMemoryError`, CUDA's "out of memory", the CPU allocator's "can't
  allocate memory") -> `ResourceExhausted` / `OUT_OF_MEMORY` (HTTP 503).  The failed request's
  tensors are released (its frames cleared, CUDA's cached blocks handed back), and the daemon
  serves the next request;
- an accelerator error that poisons the CUDA context (`torch.AcceleratorError`, a device-side
  assert, an illegal address, a launch failure) -> `Unavailable` / `ACCELERATOR_FAILED`, and
  `is_fatal()` is True: every later kernel launch on that context fails too, so the daemon must
  stop accepting work and exit non-zero for systemd to restart it with a fresh context;
- anything else -> None (the worker reports `INTERNAL` with the traceback in the log).
"""

from __future__ import annotations

import gc
import logging
import traceback

import torch

from vallexd.errors import ResourceExhausted, Unavailable, VallexError

log = logging.getLogger(__name__)

# Message fragments of CUDA errors after which the context is unusable ("sticky" errors).  Kept
# narrow on purpose: a false "fatal" restarts the daemon, a missed one leaves it failing every request.
_FATAL_MARKERS = (
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "launch timed out",
    "hardware stack error",
    "uncorrectable ecc",
    "cudaerrorlaunchfailure",
    "cublas_status_execution_failed",
)
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's OOM type and for allocator errors raised as a plain RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


def is_fatal(exc: BaseException) -> bool:
    """True when the accelerator's context is poisoned: the process must restart to recover."""
    if is_out_of_memory(exc):
        return False  # CUDA reports OOM through the same channel, but it is recoverable
    if isinstance(exc, torch.AcceleratorError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _FATAL_MARKERS)


def release(exc: BaseException) -> None:
    """Drop what the failed request still holds, then return CUDA's cached blocks to the driver.

    The traceback keeps every frame of the failed call alive, and with them the KV cache and the
    activations; clearing those frames is what actually frees the memory.
    """
    tb = exc.__traceback__
    if tb is not None:
        traceback.clear_frames(tb)  # frames still executing (the caller's) are skipped
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def classify(exc: BaseException, device: str = "") -> VallexError | None:
    """The typed error for a failure of the engine, or None when it is an unexpected bug (INTERNAL).

    Call it from the except block that caught `exc` (in the model thread): for OOM it releases the
    request's memory as a side effect.
    """
    if isinstance(exc, VallexError):
        return exc
    where = f" on {device}" if device else ""
    if is_out_of_memory(exc):
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        log.warning("out of memory%s: %s", where, first)
        release(exc)
        return ResourceExhausted(
            f"out of memory{where} for this request; retry later or with shorter text",
            reason="OUT_OF_MEMORY",
        )
    if is_fatal(exc):
        return Unavailable(
            f"the accelerator{where} failed ({type(exc).__name__}); the daemon restarts",
            reason="ACCELERATOR_FAILED",
        )
    return None
