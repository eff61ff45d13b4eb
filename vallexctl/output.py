"""What vallexctl prints and writes: JSON or human output, one-line errors, exit codes, files.

Kept apart from the commands so every command reports the same way:
machine-readable output goes to stdout (with `--json`), everything meant for
a person about progress or failure goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vallexctl.client import DaemonUnreachable
from vallexctl.context import State, state
from vallexd.errors import ErrorCode, InvalidArgument, NotFound, VallexError
from vallexd.storage import fsutil

# The rules, documented in the README ("Exit codes") and `vallexctl --help`; tests/integration/
# test_exit_codes.py checks each row through the real CLI.
EXIT_OK = 0  # done, including "nothing to do" (`daemon stop` when none runs)
EXIT_OTHER = 1  # any other failure: network, digest mismatch, the daemon refused or failed
EXIT_USAGE = 2  # a bad option or argument, or a daemon configuration that cannot work here
EXIT_UNREACHABLE = 3  # no daemon answers at the socket
EXIT_NOT_FOUND = 4  # unknown voice or preset, missing file or model files, a URL that answers 404
EXIT_BUSY = 5  # retry later: the queue is full, or the model is still loading
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_PIPE_CLOSED = 141  # stdout's reader went away (`| head`), as for a tool killed by SIGPIPE

_EXIT_FOR_CODE = {
    ErrorCode.INVALID_ARGUMENT: EXIT_USAGE,
    ErrorCode.NOT_FOUND: EXIT_NOT_FOUND,
    ErrorCode.UNKNOWN_METHOD: EXIT_NOT_FOUND,
    ErrorCode.BUSY: EXIT_BUSY,
    ErrorCode.RESOURCE_EXHAUSTED: EXIT_BUSY,  # out of (GPU) memory: retry later or with shorter text
}
# Reasons whose code would say "usage" but which are not the user's typing.
_NOT_USAGE_REASONS = {"DIGEST_MISMATCH", "BAD_CATALOGUE", "BAD_MANIFEST", "DOWNLOAD_TOO_LARGE", "BAD_PROMPT"}
# Reasons whose code says "unavailable" (1) but which mean "retry later" (5).
_RETRY_REASONS = {"MODEL_LOADING"}


def exit_code_for(exc: VallexError) -> int:
    if isinstance(exc, DaemonUnreachable):
        return EXIT_UNREACHABLE
    if exc.reason in _NOT_USAGE_REASONS:
        return EXIT_OTHER
    if exc.reason in _RETRY_REASONS:
        return EXIT_BUSY
    return _EXIT_FOR_CODE.get(exc.code, EXIT_OTHER)


# What to do next, appended to daemon errors in vallexctl's own terms (a flag, a command). The
# daemon often ends its message with "; advice" in protocol terms ("set overwrite to replace it",
# "retry later"): where vallexctl has a hint, it REPLACES that advice, so nothing is said twice.
# By reason first, then by code.
_HINTS: dict[str, str] = {
    "MODEL_LOADING": "wait a moment; `vallexctl status` says when the model is loaded",
    "SHUTTING_DOWN": "wait until it has stopped (`vallexctl status`), then start it again",
    "MODEL_NOT_LOADED": "see `vallexctl status` and the daemon log",
    ErrorCode.ALREADY_EXISTS.value: "add --overwrite to replace it",
    ErrorCode.BUSY.value: "retry in a moment",
    ErrorCode.RESOURCE_EXHAUSTED.value: "retry later or with shorter text",
    ErrorCode.TIMEOUT.value: "try shorter text, or raise the daemon's --request-timeout",
    ErrorCode.INTERNAL.value: "see the daemon log (journalctl -u vallexd, or "
                              "~/.local/state/vallexd/vallexd.log) for the traceback",
}


def error_line(exc: VallexError) -> str:
    """ONE line: what went wrong and what to do, each said once."""
    message = exc.message
    if isinstance(exc, DaemonUnreachable):
        hint = exc.hint
    elif exc.remote:
        # The code-based hints speak about the daemon: local errors carry their own advice.
        hint = _HINTS.get(exc.reason or "") or _HINTS.get(exc.code.value, "")
        if hint and "; " in message:
            message = message.rsplit("; ", 1)[0]  # the daemon's advice, said again below in CLI terms
    else:
        hint = ""
    if exc.code == ErrorCode.NOT_FOUND and exc.reason in ("PRESET_NOT_FOUND", "UNKNOWN_VOICE", None):
        hint = hint or "see `vallexctl presets list` for installed voices"
    line = f"vallexctl: {message}" + (f": {hint}" if hint else "")
    return " ".join(line.split())


def set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    """`--json` works before the command (global) and after it (per command)."""
    if value:
        obj = ctx.find_object(State)
        if obj is not None:
            obj.json = True
        else:  # the group's own --json: remembered until State exists
            ctx.meta["vallexctl.json"] = True
    return value


json_option = click.option(
    "--json", "json_flag", is_flag=True, expose_value=False, callback=set_json, is_eager=True,
    help="Print machine-readable JSON on stdout.",
)


def emit(data: dict[str, Any], human: str | Callable[[], None]) -> None:
    """JSON on stdout with --json, else the human rendering."""
    if state().json:
        click.echo(json.dumps(data, ensure_ascii=False, sort_keys=True))
    elif callable(human):
        human()
    else:
        click.echo(human)


def note(message: str) -> None:
    """A remark for the person at the terminal: stderr, never mixed into stdout data."""
    click.echo(message, err=True)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: a failure never leaves half a WAV."""
    path = Path(path)
    check_writable_dir(path)
    # mode None: the permissions a normal `open()` would give, with a ".part" temp a user recognises.
    fsutil.atomic_write(path, data, mode=None, suffix=".part")


def check_writable_dir(path: Path) -> Path:
    """The folder `path` will be written in; NotFound/InvalidArgument now rather than after the work."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise NotFound(f"cannot write {path}: the folder {directory} does not exist", reason="NO_SUCH_DIR")
    if path.is_dir():
        raise InvalidArgument(f"cannot write {path}: it is a folder", reason="IS_A_DIRECTORY")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InvalidArgument(f"cannot write in {directory}: permission denied", reason="NOT_WRITABLE")
    return directory


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressLine:
    """A one-line progress display on stderr, redrawn in place (TTY) or printed at milestones."""

    def __init__(self, label: str, *, enabled: bool, unit: str = "bytes") -> None:
        self.label = label
        self.enabled = enabled
        self.unit = unit
        self.tty = stderr_is_tty()
        self._last_pct = -1
        self._last_draw = 0.0
        self._start = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        import time

        from vallexctl.units import format_duration, format_size

        now = time.monotonic()
        if not self._start:
            self._start = now
        pct = int(done * 100 / total) if total else -1
        finished = total is not None and done >= total
        if self.tty:
            if not finished and now - self._last_draw < 0.1:
                return
        elif self.unit == "bytes" and pct // 25 == self._last_pct // 25 and not finished:
            return  # not a TTY (a log): a line at 0, 25, 50, 75, 100 % (but every piece)
        self._last_pct, self._last_draw = pct, now
        if self.unit == "bytes":
            rate = done / max(now - self._start, 1e-6)
            amount = f"{format_size(done)}" + (f" / {format_size(total)}" if total else "")
            eta = ""
            if total and rate > 0 and not finished:
                eta = f"  ETA {format_duration((total - done) / rate)}"
            text = f"{self.label}  {pct if pct >= 0 else '?':>3}%  {amount}  {format_size(rate)}/s{eta}"
        else:
            text = f"{self.label}  {done}/{total if total else '?'} {self.unit}"
        if self.tty:
            click.echo("\r\033[K" + text, err=True, nl=finished)
        else:
            click.echo(text, err=True)
