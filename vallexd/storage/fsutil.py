"""Crash-safe file writes and streaming digests, shared by the cache, prompts, tools and the client.

Torch-free (the client imports it).

A reader (the static server, a client, the next daemon start) must see either the old file or the
new one, never half of one: write a temp file in the destination's folder (same filesystem, so the
rename is atomic), fsync it, `os.replace` it over the target, then fsync the folder so the rename
itself survives a power cut.  Temp names start with "." so scans of `*.npz`/`*.wav` never pick them
up; callers that sweep leftovers at start pass their own prefix/suffix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20


#: A temp file younger than this may be another process's write in progress (replicas sharing a
#: folder): a sweep leaves it alone. Far longer than any write takes (a WAV or a prompt: seconds).
SHARED_LEFTOVER_AGE_S = 3600.0


def sweep_temp_files(folder: Path, prefix: str, suffix: str, *, shared: bool = False) -> int:
    """Remove the temp files `atomic_write(..., prefix=, suffix=)` left in `folder` (a crash
    mid-write); returns how many. A missing folder is empty.

    A sole owner of the folder removes them all; with `shared` (Ray replicas on one cache or
    presets folder) only those older than SHARED_LEFTOVER_AGE_S, never a write in progress elsewhere.
    """
    older_than_s = SHARED_LEFTOVER_AGE_S if shared else 0.0
    cutoff = time.time() - older_than_s
    try:
        with os.scandir(folder) as it:
            leftovers = [e.path for e in it if e.name.startswith(prefix) and e.name.endswith(suffix)]
    except FileNotFoundError:
        return 0
    removed = 0
    for leftover in leftovers:
        with contextlib.suppress(FileNotFoundError):
            if older_than_s and os.stat(leftover).st_mtime > cutoff:
                continue
            os.unlink(leftover)
            removed += 1
    return removed


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; some filesystems refuse fsync on folders: ignore that."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(
    path: Path,
    *,
    mode: int | None = 0o644,
    prefix: str | None = None,
    suffix: str = ".tmp",
) -> Iterator[BinaryIO]:
    """A binary file to write progressively that appears at `path` only when the block ends
    without an exception (then fsynced and renamed over `path`); otherwise it is removed.

    `mode` None gives what a plain `open()` would (0o666 less the umask); mkstemp alone makes 0600.
    The temp file is `<prefix>XXXX<suffix>` in `path`'s folder, prefix defaulting to `.<name>.`.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if mode is None:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(
    path: Path,
    data: bytes,
    *,
    mode: int | None = 0o644,
    prefix: str | None = None,
    suffix: str = ".tmp",
) -> None:
    """Write `data` to `path` atomically (see `atomic_open`)."""
    with atomic_open(path, mode=mode, prefix=prefix, suffix=suffix) as fh:
        view = memoryview(data)
        # Chunked so a large result does not need a second full copy in one kernel call.
        for start in range(0, len(view), _CHUNK):
            fh.write(view[start : start + _CHUNK])


def sha256_file(path: Path, progress: Callable[[int, int], None] | None = None) -> str:
    """Streaming sha256 hex digest (model files are 1.5 GB: never read them whole)."""
    digest = hashlib.sha256()
    total = os.stat(path).st_size
    done = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()
