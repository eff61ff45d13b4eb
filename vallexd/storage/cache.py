"""Content-addressed cache of synthesised WAV files.

Layout: `cache_dir/<key[:2]>/<key>.wav`, key = sha256 hex of a canonical
encoding of everything that determines the audio (see `cache_key`): the service
keys on the model input itself (phoneme ids and token languages of every piece),
so two requests share an entry exactly when the model would read the same thing.  The raw
text never appears in a path, so `/`, `..` or NUL in a request cannot steer a
write.  The static file server child serves exactly this layout read-only.

Writes are atomic: a temp file in the same folder, fsync, `os.replace`, fsync
of the folder.  A crash leaves at most a `.tmp-*.part` file, which is swept
when the cache is opened at daemon start (one daemon per cache: the lock file).  Replicas that
share one cache folder (vallexd.serve) open it with `shared=True`: a sweep then spares temp files
younger than an hour, which may be another replica's write in progress; two replicas writing the
same key each rename a complete file over it, so the entry is always whole.

"Last used" = the newer of atime and mtime; a hit refreshes both explicitly
because many mounts use noatime/relatime.  `prune` removes least recently used
entries first.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vallexd.errors import PermissionDenied, Unavailable, VallexError
from vallexd.storage import fsutil

log = logging.getLogger(__name__)

#: Bump when anything about how audio is produced for a key changes (not the weights:
#: those are in the engine identity).
CACHE_FORMAT_VERSION = 2  # 2: keyed on the model input (phoneme ids), not the text
TMP_PREFIX = ".tmp-"
TMP_SUFFIX = ".part"
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_FILE_MODE = 0o644  # "return": "path" hands the path to clients of the socket group: let them read it


def cache_key(**fields: Any) -> str:
    """sha256 hex over a canonical JSON encoding of `fields` and the cache format version.

    The caller passes everything that determines the audio (the service: the engine identity,
    the digest of the model input, the prompt digest, sampling; see `Service._cache_key`);
    a new input is a new keyword. Tuples encode as lists; keys are sorted.
    """
    doc = {"format": CACHE_FORMAT_VERSION, **fields}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=list)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"not a cache key: {key!r}")
    return key


def static_url(base_url: str, key: str) -> str:
    """The URL of cache entry `key` on the static file server at `base_url`."""
    return f"{base_url.rstrip('/')}/{relative_url_path(key)}"


def relative_url_path(key: str) -> str:
    """URL path of an entry below the static server's root, e.g. 'ab/ab12...ef.wav'."""
    check_key(key)
    return f"{key[:2]}/{key}.wav"


_DENIED_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def os_error(exc: OSError, action: str, reason: str) -> VallexError:
    """A typed error for a failed write/remove: PERMISSION_DENIED when the file system refuses
    (no permission, read-only), else UNAVAILABLE (disk full, I/O error, ...)."""
    message = f"cannot {action}: {exc.strerror or exc}"
    if exc.errno in _DENIED_ERRNOS:
        return PermissionDenied(message, reason=reason)
    return Unavailable(message, reason=reason)


def atomic_write(path: Path, data: bytes, mode: int = _FILE_MODE) -> None:
    """Atomic write with the cache's temp naming, so `sweep` can find a crash's leftovers."""
    fsutil.atomic_write(path, data, mode=mode, prefix=TMP_PREFIX, suffix=TMP_SUFFIX)


@dataclass(frozen=True)
class Entry:
    path: Path
    size: int
    last_used: float


class ResultCache:
    """The WAV cache under one folder. Methods are blocking (call them off the event loop)."""

    def __init__(self, root: Path, *, shared: bool = False) -> None:
        self.root = Path(root)
        self.shared = shared
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep_leftovers()

    # ------------------------------------------------------------------ layout
    def path(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / f"{key}.wav"

    def _shards(self) -> list[Path]:
        try:
            with os.scandir(self.root) as it:
                return [
                    Path(e.path)
                    for e in it
                    if _SHARD_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                ]
        except FileNotFoundError:
            return []

    def sweep_leftovers(self) -> int:
        """Remove temp files a crash left behind; returns how many. Only at start (we own the dir,
        or with `shared`, only old ones: see the module docstring)."""
        removed = sum(fsutil.sweep_temp_files(folder, TMP_PREFIX, TMP_SUFFIX, shared=self.shared)
                      for folder in [self.root, *self._shards()])
        if removed:
            log.info("cache: swept %d leftover temp file(s) in %s", removed, self.root)
        return removed

    # ------------------------------------------------------------------ entries
    def lookup(self, key: str) -> Path | None:
        """Path of a complete entry (and mark it used), or None."""
        path = self.path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if st.st_size < 44:  # shorter than a WAV header: not ours, treat as a miss
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        return path

    def get(self, key: str) -> bytes | None:
        """The cached WAV bytes, or None on a miss. Touches the entry (LRU)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) < 44 or data[:4] != b"RIFF":
            log.warning("cache: ignoring damaged entry %s", path.name)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        return data

    def put(self, key: str, data: bytes) -> Path:
        """Store `data` under `key`, atomically replacing any previous entry.

        Raises Unavailable(CACHE_WRITE_FAILED) whatever the cause (disk full, read-only, no
        permission): the cache is the daemon's own storage, so this is the server's problem
        (503), never the client's (403). A failed write leaves no temp file and no shard
        folder it created.
        """
        path = self.path(key)
        shard = path.parent
        created = not shard.is_dir()
        try:
            shard.mkdir(parents=True, exist_ok=True)  # the root may have been removed meanwhile
            atomic_write(path, data)
        except OSError as exc:
            if created:
                with contextlib.suppress(OSError):
                    shard.rmdir()  # only if still empty: another writer may have used it meanwhile
            raise Unavailable(f"cannot write the result to the cache: {exc.strerror or exc}",
                              reason="CACHE_WRITE_FAILED") from None
        return path

    def entries(self) -> list[Entry]:
        found: list[Entry] = []
        for shard in self._shards():
            with os.scandir(shard) as it:
                for e in it:
                    if not (e.name.endswith(".wav") and _KEY_RE.fullmatch(e.name[:-4])):
                        continue
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:  # pruned meanwhile
                        continue
                    found.append(Entry(Path(e.path), st.st_size, max(st.st_atime, st.st_mtime)))
        return found

    def stats(self) -> dict[str, Any]:
        entries = self.entries()
        result: dict[str, Any] = {
            "files": len(entries),
            "bytes": sum(e.size for e in entries),
            "dir": str(self.root),
        }
        if entries:
            result["oldest"] = min(e.last_used for e in entries)
            result["newest"] = max(e.last_used for e in entries)
        return result

    def prune(
        self,
        max_age_s: float | None = None,
        max_bytes: int | None = None,
        dry_run: bool = False,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Remove entries unused for over `max_age_s`, then least recently used ones until the
        total is at most `max_bytes`.  `dry_run` reports what would go and removes nothing."""
        now = time.time() if now is None else now
        entries = sorted(self.entries(), key=lambda e: e.last_used)
        total = sum(e.size for e in entries)
        doomed: list[Entry] = []
        kept: list[Entry] = []
        for e in entries:
            too_old = max_age_s is not None and now - e.last_used > max_age_s
            too_big = max_bytes is not None and total > max_bytes
            if too_old or too_big:
                doomed.append(e)
                total -= e.size
            else:
                kept.append(e)
        removed: list[Entry] = []
        for e in doomed:
            if dry_run:
                removed.append(e)
                continue
            try:
                e.path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                # The cache is the daemon's own storage: its failures are the server's (503).
                raise Unavailable(f"cannot remove {e.path.name} from the cache: {exc.strerror or exc}",
                                  reason="CACHE_WRITE_FAILED") from None
            removed.append(e)
        return {
            "removed": len(removed),
            "freed_bytes": sum(e.size for e in removed),
            "files": [str(e.path.relative_to(self.root)) for e in removed],
            "dry_run": dry_run,
            # After the prune; for a dry run, what *would* remain.
            "remaining_files": len(kept),
            "remaining_bytes": sum(e.size for e in kept),
        }
