"""Typed errors shared by the daemon, its wire formats and the client.

This module is torch-free on purpose: `vallexctl` imports it to read wire
errors, and it must start fast.  Every failure that reaches a client is a
`VallexError` carrying an `ErrorCode`; the daemon converts anything else to
`INTERNAL` in exactly one place (see `vallexd.server.rpc` / `vallexd.server.http_api`).
"""

from __future__ import annotations

import reprlib
from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    """Wire error codes. The string value is what travels on the wire."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # a field is missing, of the wrong type or out of range
    NOT_FOUND = "NOT_FOUND"  # unknown preset, unknown method target, missing file
    ALREADY_EXISTS = "ALREADY_EXISTS"  # e.g. installing a preset over an existing one without overwrite
    TOO_LARGE = "TOO_LARGE"  # frame, body, text or audio over a configured limit
    BUSY = "BUSY"  # the queue is full; retry later
    TIMEOUT = "TIMEOUT"  # the request ran past its deadline
    UNAUTHENTICATED = "UNAUTHENTICATED"  # missing or wrong bearer token (HTTP)
    PERMISSION_DENIED = "PERMISSION_DENIED"  # e.g. Host header not allowed
    PROTOCOL_ERROR = "PROTOCOL_ERROR"  # malformed frame or msgpack, unsupported protocol version
    UNKNOWN_METHOD = "UNKNOWN_METHOD"  # RPC method name not known
    UNAVAILABLE = "UNAVAILABLE"  # the daemon is shutting down or the model is not loaded
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # the device ran out of memory for this request; retry later
    INTERNAL = "INTERNAL"  # a bug or an unexpected failure; details are in the daemon log


#: HTTP status for each code, used by the HTTP API and documented in docs/protocol.md.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.PROTOCOL_ERROR: 400,
    ErrorCode.UNKNOWN_METHOD: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.BUSY: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.RESOURCE_EXHAUSTED: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.INTERNAL: 500,
}


class VallexError(Exception):
    """An error with a wire code, a human message and an optional machine-readable reason.

    `reason` narrows the code (e.g. code INVALID_ARGUMENT, reason "EMPTY_TEXT") so
    scripts can branch on it without parsing the message.
    """

    code: ErrorCode = ErrorCode.INTERNAL
    #: True when the error was received from the daemon (from_wire), False when raised locally.
    remote: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.reason = reason
        self.details = details or {}

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.reason:
            wire["reason"] = self.reason
        if self.details:
            wire["details"] = self.details
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> VallexError:
        """Rebuild an error received from the daemon; tolerate junk without crashing."""
        if not isinstance(wire, dict):
            return VallexError(f"malformed error from daemon: {short_repr(wire)}",
                               code=ErrorCode.PROTOCOL_ERROR)
        try:
            code = ErrorCode(wire.get("code"))
        except ValueError:
            code = ErrorCode.INTERNAL
        message = str(wire.get("message", ""))
        reason = wire.get("reason")
        details = wire.get("details") if isinstance(wire.get("details"), dict) else None
        err = _CLASS_FOR_CODE.get(code, VallexError)(
            message, code=code, reason=str(reason) if reason else None, details=details
        )
        err.remote = True
        return err

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class InvalidArgument(VallexError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFound(VallexError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(VallexError):
    code = ErrorCode.ALREADY_EXISTS


class TooLarge(VallexError):
    code = ErrorCode.TOO_LARGE


class Busy(VallexError):
    code = ErrorCode.BUSY


class Timeout(VallexError):
    code = ErrorCode.TIMEOUT


class Unauthenticated(VallexError):
    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(VallexError):
    code = ErrorCode.PERMISSION_DENIED


class ProtocolError(VallexError):
    code = ErrorCode.PROTOCOL_ERROR


class UnknownMethod(VallexError):
    code = ErrorCode.UNKNOWN_METHOD


class Unavailable(VallexError):
    code = ErrorCode.UNAVAILABLE


class ResourceExhausted(Unavailable):
    """The request needed more (GPU or CPU) memory than was free; nothing was kept, the daemon goes on.

    A kind of `Unavailable` (retry later, or with shorter text) with its own wire code.
    """

    code = ErrorCode.RESOURCE_EXHAUSTED


class Internal(VallexError):
    code = ErrorCode.INTERNAL


_CLASS_FOR_CODE: dict[ErrorCode, type[VallexError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument, NotFound, AlreadyExists, TooLarge, Busy, Timeout, Unauthenticated,
        PermissionDenied, ProtocolError, UnknownMethod, Unavailable, ResourceExhausted, Internal,
    )
}


def text_too_long(length: int, limit: int) -> TooLarge:
    """The one TEXT_TOO_LONG error (validation and the text front end raise the same keys)."""
    return TooLarge(f"text has {length} characters; the limit is {limit} (split it, or raise the daemon's "
                    "max_text_chars: --max-text-chars / VALLEXD_MAX_TEXT_CHARS)", reason="TEXT_TOO_LONG",
                    details={"field": "text", "limit": limit, "length": length})


def cancelled_error() -> Timeout:
    """The one CANCELLED error: the request's client went away (every transport and stage)."""
    return Timeout("request cancelled: the client went away", reason="CANCELLED")


def deadline_error(timeout_s: float) -> Timeout:
    """The one DEADLINE error: a request ran past its `timeout_s` (request_timeout_s)."""
    return Timeout(f"request ran past its deadline of {timeout_s:g} s", reason="DEADLINE",
                   details={"timeout_s": timeout_s})


_REPR = reprlib.Repr()
_REPR.maxlevel = 2  # a 1000-deep list is shown as [[...]], never recursed into
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def short_repr(value: Any, limit: int = 60) -> str:
    """repr() of an untrusted value, bounded: at most `limit` characters and 2 levels deep.

    Error messages quote what a client sent; a 16 MiB string or a list nested 1000 deep must
    give a short message (not a RecursionError, nor a 16 MiB log line).
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # a hostile __repr__ cannot reach here from the wire, but stay total
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."

