"""Downloading files: one implementation for model weights and voice presets.

`download()` streams a URL into `<dest>.part`, resumes an interrupted transfer
with an HTTP Range request (guarded by If-Range with the first response's ETag
or Last-Modified, kept in `<dest>.part.validator`, so bytes of a file that
changed upstream are never spliced together), checks the size and the sha256,
and only then renames the part file over `dest` (after an fsync), so `dest` is
either absent or complete and verified.  A digest mismatch deletes
the part file: nothing unverified is left behind.

Standard library only (urllib): the client must start fast and must not need
anything the daemon does not already pull in.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vallexd.errors import ErrorCode, InvalidArgument, NotFound, VallexError
from vallexd.storage.fsutil import sha256_file

#: progress(done_bytes, total_bytes_or_None); called often, keep it cheap.
Progress = Callable[[int, "int | None"], None]

CHUNK = 1 << 16
USER_AGENT = "vallexctl/0.1 (urllib)"
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DownloadFailed(VallexError):
    """The transfer could not be completed (network, HTTP status, short read)."""

    code = ErrorCode.UNAVAILABLE


class DigestMismatch(InvalidArgument):
    """The downloaded bytes are not the ones we expected; they have been deleted."""


@dataclass(frozen=True)
class FetchResult:
    path: Path
    sha256: str
    size: int
    resumed: bool  # some bytes came from an earlier, interrupted attempt


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def check_digest(actual: str, *, sha256: str | None, sha256_prefix: str | None, what: str) -> None:
    """Raise DigestMismatch unless `actual` matches the full digest and/or the prefix given."""
    if sha256 is not None and actual != sha256.lower():
        raise DigestMismatch(
            f"{what}: sha256 is {actual}, expected {sha256.lower()}",
            reason="DIGEST_MISMATCH",
            details={"expected": sha256.lower(), "actual": actual},
        )
    if sha256_prefix is not None and not actual.startswith(sha256_prefix.lower()):
        raise DigestMismatch(
            f"{what}: sha256 is {actual}, which does not start with {sha256_prefix.lower()}",
            reason="DIGEST_MISMATCH",
            details={"expected_prefix": sha256_prefix.lower(), "actual": actual},
        )


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    progress: Progress | None = None,
    retries: int = 2,
    timeout: float = 30.0,
    max_bytes: int | None = None,
    backoff: float = 0.5,
) -> FetchResult:
    """Fetch `url` into `dest` atomically, resuming `<dest>.part` if an earlier attempt left one.

    `retries` extra attempts are made after a dropped connection, each resuming
    where the last stopped, after `backoff` x attempt seconds.  Raises DownloadFailed,
    NotFound (HTTP 404/410), DigestMismatch, or InvalidArgument DOWNLOAD_TOO_LARGE
    (over `max_bytes`).
    """
    if not url.startswith(("http://", "https://")):
        raise InvalidArgument(f"not an http(s) URL: {url!r}", reason="BAD_URL")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    attempt = 0
    restarts = 0
    resumed = False
    while True:
        try:
            resumed = _transfer(url, part, progress=progress, timeout=timeout, max_bytes=max_bytes) or resumed
            break
        except _Restart as exc:
            # The part file cannot be continued (see _transfer); it is gone now. Starting over is
            # not a failed attempt, but do it at most twice so a confused server cannot loop us.
            restarts += 1
            if restarts > 2:
                raise DownloadFailed(f"download of {url} failed: {exc}", reason="DOWNLOAD_FAILED") from None
        except _Retryable as exc:
            attempt += 1
            if attempt > retries:
                raise DownloadFailed(
                    f"download of {url} failed: {exc}; run the command again to resume "
                    f"({part.stat().st_size if part.exists() else 0} bytes kept in {part})",
                    reason="DOWNLOAD_FAILED",
                ) from None
            time.sleep(min(backoff * attempt, 5.0))

    actual = sha256_file(part)
    try:
        check_digest(actual, sha256=sha256, sha256_prefix=sha256_prefix, what=url)
    except DigestMismatch:
        _discard(part)  # never keep, and never resume from, bytes we know are wrong
        raise
    size = part.stat().st_size
    _fsync_path(part)
    os.replace(part, dest)
    _validator_path(part).unlink(missing_ok=True)
    _fsync_path(dest.parent)
    return FetchResult(path=dest, sha256=actual, size=size, resumed=resumed)


class _Retryable(Exception):
    """A transfer problem worth another (resuming) attempt."""


class _Restart(Exception):
    """The part file was discarded; fetch from byte 0."""


def _transfer(
    url: str, part: Path, *, progress: Progress | None, timeout: float, max_bytes: int | None
) -> bool:
    """One attempt: append to `part` from where it ends, or restart it when the server will not resume.

    Returns True when bytes of an earlier attempt were kept (a real resume).
    """
    have = part.stat().st_size if part.exists() else 0
    resp = _open(url, part, have, timeout)
    if resp is None:  # 416 for exactly what we have: the part file is already complete
        return True
    with resp:
        start, total = _accepted_range(resp, url, part, have, max_bytes)
        done = _receive(resp, url, part, start, total, progress, max_bytes)
    _check_length(url, part, done, total)
    return start > 0


def _request_headers(part: Path, have: int) -> dict[str, str]:
    """Plain GET, or a Range for the bytes after `have`, guarded by If-Range when we know a validator."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    validator = _validator_path(part)
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator.exists():
            # If the file changed upstream since the part was started, the server sends it whole
            # (200) instead of splicing new bytes onto old ones.
            headers["If-Range"] = validator.read_text(encoding="ascii").strip()
    return headers


def _open(url: str, part: Path, have: int, timeout: float) -> Any:
    """The response, None when the part file is already complete; HTTP failures become our errors."""
    req = urllib.request.Request(url, headers=_request_headers(part, have))
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:
            # "bytes */N" with N == what we have: the part file is already complete (an earlier run
            # stopped between the last byte and the rename); keep it, the digest check decides.
            complete = re.fullmatch(r"bytes \*/(\d+)", (exc.headers.get("Content-Range") or "").strip())
            if complete and int(complete.group(1)) == have:
                return None
            # Otherwise our part file is longer than the resource: it cannot be a prefix of it.
            _discard(part)
            raise _Restart(f"server refused the resume range ({exc.code})") from None
        if exc.code in (404, 410):
            raise NotFound(f"{url} does not exist (HTTP {exc.code})", reason="HTTP_NOT_FOUND") from None
        if exc.code >= 500 or exc.code == 429:
            raise _Retryable(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadFailed(f"{url}: HTTP {exc.code} {exc.reason}", reason="HTTP_ERROR") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadFailed(f"cannot reach {url}: {reason}; check the network connection (or proxy "
                             "settings) and run the command again", reason="UNREACHABLE") from None


def _accepted_range(resp: Any, url: str, part: Path, have: int,
                    max_bytes: int | None) -> tuple[int, int | None]:
    """(offset the body starts at, total size or None); refuses a range we did not ask for or a file
    over `max_bytes`, and remembers the validator of a whole-file answer for the next resume."""
    planned = _plan(resp, have)
    if planned is None:  # a range we did not ask for: refuse to splice it in
        _discard(part)
        raise _Restart(f"server answered an unexpected range for offset {have}")
    start, total = planned
    if max_bytes is not None and total is not None and total > max_bytes:
        raise InvalidArgument(
            f"{url} is {total} bytes, over the limit of {max_bytes}", reason="DOWNLOAD_TOO_LARGE"
        )
    if not start:
        _remember_validator(resp, _validator_path(part))
    return start, total


def _receive(resp: Any, url: str, part: Path, start: int, total: int | None, progress: Progress | None,
             max_bytes: int | None) -> int:
    """Stream the body into `part` (appending at `start`, or from scratch); returns the bytes now held."""
    # start == 0 with a part file: the server ignored Range (200): truncate and take it whole.
    done = start
    with part.open("ab" if start else "wb") as out:
        if progress is not None:
            progress(done, total)
        try:
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                if max_bytes is not None and done > max_bytes:
                    out.close()
                    _discard(part)
                    raise InvalidArgument(
                        f"{url} is over the limit of {max_bytes} bytes", reason="DOWNLOAD_TOO_LARGE"
                    )
                if progress is not None:
                    progress(done, total)
        except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
            out.flush()
            raise _Retryable(f"connection lost after {done} bytes ({exc})") from None
        out.flush()
        os.fsync(out.fileno())
    return done


def _check_length(url: str, part: Path, done: int, total: int | None) -> None:
    # http.client does not raise when the peer closes before Content-Length: check it ourselves.
    if total is not None and done < total:
        raise _Retryable(f"connection closed after {done} of {total} bytes")
    if total is not None and done > total:
        _discard(part)
        raise DownloadFailed(f"{url}: server sent {done} bytes, more than announced ({total})",
                             reason="BAD_LENGTH")


def _validator_path(part: Path) -> Path:
    return part.with_name(part.name + ".validator")


def _remember_validator(resp: object, path: Path) -> None:
    """Keep the response's strong ETag (or Last-Modified) beside the part file for If-Range."""
    headers = resp.headers  # type: ignore[attr-defined]
    etag = (headers.get("ETag") or "").strip()
    value = etag if etag and not etag.startswith("W/") else (headers.get("Last-Modified") or "").strip()
    if value and value.isascii():
        path.write_text(value + "\n", encoding="ascii")
    else:
        path.unlink(missing_ok=True)


def _discard(part: Path) -> None:
    """Drop a part file that cannot be continued, with its validator."""
    part.unlink(missing_ok=True)
    _validator_path(part).unlink(missing_ok=True)


def _plan(resp: object, have: int) -> tuple[int, int | None] | None:
    """(offset this response starts at, total size or None) from status and headers."""
    status = getattr(resp, "status", 200)
    headers = resp.headers  # type: ignore[attr-defined]
    length = headers.get("Content-Length")
    if status == 206:
        match = _CONTENT_RANGE.match(headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != have:
            return None
        total = None if match.group(3) == "*" else int(match.group(3))
        return have, total
    total = int(length) if length and length.isdigit() else None
    return 0, total


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
