"""The WAV cache: key sensitivity, paths never made from text, atomic writes (real crash), prune."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from vallexd.errors import PermissionDenied, Unavailable
from vallexd.storage import cache as cache_mod
from vallexd.storage.cache import ResultCache, cache_key, relative_url_path

BASE: dict[str, Any] = {
    "engine_identity": "e" * 64,
    "preset_digest": "p" * 64,
    "text": "Hello world.",
    "language": "en",
    "accent": "native",
    "long": "auto",
    "top_k": 0,
    "temperature": 1.0,
    "seed": None,
}
VARIANTS: list[tuple[str, Any]] = [
    ("engine_identity", "f" * 64),
    ("preset_digest", None),
    ("preset_digest", "q" * 64),
    ("text", "Hello world!"),
    ("language", "auto"),
    ("accent", "request"),
    ("long", True),
    ("long", False),
    ("top_k", 5),
    ("temperature", 0.9),
    ("seed", 0),
    ("seed", 1),
]


def wav_like(n: int = 100, fill: bytes = b"\x01") -> bytes:
    return b"RIFF" + b"\0" * 40 + fill * n


@pytest.mark.parametrize(("field", "value"), VARIANTS)
def test_key_changes_with_every_field(field: str, value: Any) -> None:
    assert cache_key(**{**BASE, field: value}) != cache_key(**BASE)


def test_key_is_canonical() -> None:
    key = cache_key(**BASE)
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key(**dict(reversed(list(BASE.items())))) == key  # field order does not matter
    # tuples and lists encode alike (pieces arrive as tuples of ids)
    assert cache_key(**{**BASE, "text": ("a", 1)}) == cache_key(**{**BASE, "text": ["a", 1]})
    # a new field is a new keyword, and changes the key
    assert cache_key(**BASE, output_format="mp3") != key


@pytest.mark.parametrize("text", ["a/b", "../../etc/passwd", "x\0y", "/abs", "..", "\\..\\", "ä" * 3000])
def test_text_never_in_a_path(tmp_path: Path, text: str) -> None:
    cache = ResultCache(tmp_path / "c")
    key = cache_key(**{**BASE, "text": text})
    path = cache.put(key, wav_like())
    assert path == tmp_path / "c" / key[:2] / f"{key}.wav"
    assert path.resolve().parent.parent == (tmp_path / "c").resolve()
    assert sorted(p.name for p in (tmp_path / "c").rglob("*")) == sorted([key[:2], f"{key}.wav"])


def test_bad_keys_refused(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path)
    for bad in ["../" + "a" * 61, "A" * 64, "a" * 63, "a" * 64 + "/", ""]:
        with pytest.raises(ValueError):
            cache.path(bad)


def test_layout_matches_static_server() -> None:
    from vallexd.server.static_server import PATH_RE  # the child serves exactly this layout

    key = cache_key(**BASE)
    assert relative_url_path(key) == f"{key[:2]}/{key}.wav"
    assert PATH_RE.match("/" + relative_url_path(key))


def test_roundtrip_lookup_and_replace(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path)
    key = cache_key(**BASE)
    assert cache.get(key) is None and cache.lookup(key) is None
    cache.put(key, wav_like(10))
    assert cache.get(key) == wav_like(10)
    assert cache.lookup(key) == cache.path(key)
    assert (cache.path(key).stat().st_mode & 0o777) == 0o644
    cache.put(key, wav_like(20, b"\x02"))  # fresh: replace in place
    assert cache.get(key) == wav_like(20, b"\x02")


def test_damaged_entry_is_a_miss(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path)
    key = cache_key(**BASE)
    cache.path(key).parent.mkdir()
    cache.path(key).write_bytes(b"RIFF")
    assert cache.get(key) is None and cache.lookup(key) is None


def test_exception_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ResultCache(tmp_path)
    key = cache_key(**BASE)
    cache.put(key, wav_like(10))

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "fsync", broken_fsync)
    with pytest.raises(Unavailable) as info:  # typed: disk full is not the client's fault
        cache.put(key, wav_like(5000, b"\x09"))
    assert info.value.reason == "CACHE_WRITE_FAILED"
    monkeypatch.undo()
    assert cache.get(key) == wav_like(10)  # the old entry is untouched
    assert [p.name for p in cache.path(key).parent.iterdir()] == [f"{key}.wav"]  # no temp file left


def test_killed_writer_leaves_no_partial_file_and_leftover_is_swept(tmp_path: Path) -> None:
    """A real child process is SIGKILLed while its write is in progress (parked before fsync)."""
    key = cache_key(**BASE)
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from vallexd.storage import cache as c
        def parked_fsync(fd):
            print("WRITING", flush=True)
            time.sleep(60)
        c.os.fsync = parked_fsync
        c.ResultCache(Path({str(tmp_path)!r})).put({key!r}, b"RIFF" + b"\\0" * (4 << 20))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    shard = tmp_path / key[:2]
    leftovers = [p.name for p in shard.iterdir()]
    assert not (shard / f"{key}.wav").exists()  # never a partial entry under the real name
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")
    reopened = ResultCache(tmp_path)  # daemon restart sweeps the leftover
    assert list(shard.iterdir()) == []
    assert reopened.get(key) is None


def _entries(
    tmp_path: Path, sizes_ages: list[tuple[int, float]], now: float
) -> tuple[ResultCache, list[str]]:
    cache = ResultCache(tmp_path)
    keys = []
    for i, (size, age) in enumerate(sizes_ages):
        key = cache_key(**{**BASE, "seed": i})
        path = cache.put(key, wav_like(size))
        os.utime(path, (now - age, now - age))
        keys.append(key)
    return cache, keys


def test_stats(tmp_path: Path) -> None:
    now = 1_700_000_000.0
    cache, _ = _entries(tmp_path, [(100, 10), (200, 20)], now)
    stats = cache.stats()
    assert stats["files"] == 2 and stats["bytes"] == 144 + 244 and stats["dir"] == str(tmp_path)
    assert stats["oldest"] == now - 20 and stats["newest"] == now - 10


def test_prune_by_age(tmp_path: Path) -> None:
    now = 1_700_000_000.0
    cache, keys = _entries(tmp_path, [(100, 5000), (100, 50), (100, 9000)], now)
    result = cache.prune(max_age_s=1000, now=now)
    assert result["removed"] == 2 and result["freed_bytes"] == 288
    assert sorted(result["files"]) == sorted(relative_url_path(k) for k in (keys[0], keys[2]))
    assert (result["remaining_files"], result["remaining_bytes"]) == (1, 144)
    assert cache.get(keys[1]) is not None and cache.lookup(keys[0]) is None


def test_prune_by_size_oldest_first_and_hits_refresh(tmp_path: Path) -> None:
    now = 1_700_000_000.0
    cache, keys = _entries(tmp_path, [(1000, 300), (1000, 200), (1000, 100)], now)
    cache.get(keys[0])  # a hit makes the oldest the most recently used
    result = cache.prune(max_bytes=2100)
    assert result["files"] == [relative_url_path(keys[1])]
    assert result["remaining_bytes"] == 2 * 1044 <= 2100


def test_prune_dry_run_changes_nothing(tmp_path: Path) -> None:
    now = 1_700_000_000.0
    cache, _ = _entries(tmp_path, [(100, 5000), (100, 50), (100, 9000)], now)

    def snapshot() -> list[tuple[str, int, int]]:
        return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*.wav"))

    before = snapshot()
    dry = cache.prune(max_age_s=1000, max_bytes=0, dry_run=True, now=now)
    assert snapshot() == before
    assert dry["dry_run"] is True and dry["removed"] == 3 and dry["remaining_files"] == 0
    real = cache.prune(max_age_s=1000, max_bytes=0, now=now)
    real.pop("dry_run")
    dry.pop("dry_run")
    assert real == dry  # the dry run reported exactly what the real one did
    assert cache.stats()["files"] == 0


def test_write_failures_are_typed(tmp_path: Path) -> None:
    import errno
    import shutil

    cache = ResultCache(tmp_path / "cache")
    key = cache_key(**BASE)
    shutil.rmtree(tmp_path / "cache")
    cache.put(key, wav_like(5))  # the root was removed meanwhile: recreated (parents=True)
    assert cache.get(key) == wav_like(5)
    other = cache_key(**{**BASE, "seed": 9})
    (tmp_path / "cache" / other[:2]).write_bytes(b"not a folder")  # the shard is in the way
    with pytest.raises(Unavailable) as info:
        cache.put(other, wav_like(5))
    assert info.value.reason == "CACHE_WRITE_FAILED"
    denied = cache_mod.os_error(OSError(errno.EROFS, "Read-only file system"), "write", "CACHE_WRITE_FAILED")
    assert isinstance(denied, PermissionDenied) and denied.reason == "CACHE_WRITE_FAILED"


@pytest.mark.parametrize("err", [28, 30, 13], ids=["ENOSPC", "EROFS", "EACCES"])
def test_failed_write_is_unavailable_and_leaves_no_shard(tmp_path: Path, err: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 12, fault 8: a read-only cache gave PERMISSION_DENIED (403 on /generate), and a
    # failed write left an empty shard folder behind.
    import os

    cache = ResultCache(tmp_path / "cache")
    key = cache_key(**BASE)

    def failing_write(path: Path, data: bytes, mode: int = 0o644) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(cache_mod, "atomic_write", failing_write)
    with pytest.raises(Unavailable) as info:
        cache.put(key, wav_like(5))
    assert info.value.reason == "CACHE_WRITE_FAILED" and info.value.http_status == 503
    assert os.strerror(err) in info.value.message
    assert list((tmp_path / "cache").iterdir()) == []  # no empty shard folder


def test_real_read_only_and_full_tmpfs(tmp_path: Path) -> None:
    """The same on real file systems when this process may mount a tmpfs (root), else skipped."""
    import subprocess

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the monkeypatched test covers the logic")
    try:
        cache = ResultCache(mnt / "cache")
        with pytest.raises(Unavailable) as info:  # disk full
            cache.put(cache_key(**BASE), b"RIFF" + b"\0" * 200_000)
        assert info.value.reason == "CACHE_WRITE_FAILED"
        assert list((mnt / "cache").iterdir()) == []
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(Unavailable) as info:  # read-only
            cache.put(cache_key(**{**BASE, "seed": 3}), wav_like(5))
        assert info.value.reason == "CACHE_WRITE_FAILED"
        assert list((mnt / "cache").iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
