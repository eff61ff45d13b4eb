"""Reading weight files (VALL-E X checkpoint, Vocos, EnCodec) safely, with one error family.

`torch.load(weights_only=True)` refuses pickled code, so a hostile file cannot run anything; every
way a file can be unusable becomes a `WeightsError` subclass naming the file (INVALID_ARGUMENT, a
reason per kind of file) instead of a torch traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vallexd.errors import ErrorCode, VallexError


class WeightsError(VallexError):
    """A weights file that exists but cannot be used; subclasses set the reason."""

    code = ErrorCode.INVALID_ARGUMENT
    reason_code = "BAD_WEIGHTS"

    def __init__(self, message: str, *, path: Path, key: str | None = None) -> None:
        details: dict[str, Any] = {"path": str(path)}
        if key is not None:
            details["key"] = key
        super().__init__(f"{path}: {message}", reason=self.reason_code, details=details)


def load_weights(path: Path, error: type[WeightsError], what: str = "state dict") -> dict[Any, Any]:
    """torch.load a dict onto the CPU; garbage, truncated or pickled files raise `error`."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many unrelated types for a bad file
        first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
        if "weights_only" in str(exc) or "Weights only load failed" in first_line:
            # torch's advice (load with weights_only=False) is wrong here: it would run pickled code.
            first_line = "it holds more than tensors, or is damaged"
        raise error(f"not a readable {what} ({type(exc).__name__}: {first_line})", path=path) from None
    if not isinstance(obj, dict):
        raise error(f"not a {what}", path=path)
    return obj
