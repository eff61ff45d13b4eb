"""Prompt files: every shared preset loads; every kind of corrupt file is refused; saving is atomic."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vallexd.errors import InvalidArgument, NotFound
from vallexd.storage.prompts import (
    LANG_CODES,
    Prompt,
    load_prompt,
    prompt_digest,
    prompt_from_bytes,
    prompt_to_bytes,
    save_prompt,
)


def _npz(**arrays: object) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _good_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "audio_tokens": rng.integers(0, 1024, (1, 30, 8)),
        "text_tokens": rng.integers(5, 70, (1, 12)),
        "lang_code": np.array(2, dtype=np.int32),
    }


def _refused(data: bytes, *needles: str, name: str = "voice.npz") -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        prompt_from_bytes(data, name)
    err = info.value
    assert err.reason == "BAD_PROMPT"
    assert name in err.message
    for needle in needles:
        assert needle in err.message, err.message
    return err


def test_all_shared_presets_load(shared_presets_dir: Path) -> None:
    files = sorted(shared_presets_dir.rglob("*.npz"))
    assert len(files) == 53
    languages = set()
    for path in files:
        prompt = load_prompt(path)
        assert prompt.audio_tokens.dtype == np.int64 and prompt.text_tokens.dtype == np.int64
        assert prompt.audio_tokens.shape[0] == 1 and prompt.audio_tokens.shape[2] == 8
        assert prompt.audio_tokens.shape[1] >= 1 and prompt.text_tokens.shape[0] == 1
        languages.add(prompt.language)
    assert languages == {"en", "zh", "ja"}
    assert load_prompt(shared_presets_dir / "finetuned" / "Y'shtola-Finetuned.npz").language == "ja"
    # int32 lang_code in most upstream files, int64 elsewhere: both read the same.
    assert load_prompt(shared_presets_dir / "upstream" / "paimon.npz").language == "zh"


def test_good_file_normalised() -> None:
    arrays = _good_arrays()
    arrays["audio_tokens"] = arrays["audio_tokens"].astype(np.int16)
    prompt = prompt_from_bytes(_npz(**arrays), "v.npz")
    assert prompt.language == "en" and prompt.audio_tokens.dtype == np.int64
    assert prompt.num_frames == 30


def test_not_a_zip_and_truncated() -> None:
    _refused(b"hello, I am not an npz", "not an .npz")
    whole = _npz(**_good_arrays())
    _refused(whole[: len(whole) // 2])
    _refused(b"")


@pytest.mark.parametrize("key", ["audio_tokens", "text_tokens", "lang_code"])
def test_missing_key(key: str) -> None:
    arrays = _good_arrays()
    del arrays[key]
    _refused(_npz(**arrays), f"missing array {key!r}")


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("audio_tokens", np.zeros((1, 30, 7), dtype=np.int64), "shape (1, P>=1, 8)"),
        ("audio_tokens", np.zeros((30, 8), dtype=np.int64), "shape (1, P>=1, 8)"),
        ("audio_tokens", np.zeros((1, 0, 8), dtype=np.int64), "shape (1, P>=1, 8)"),
        ("audio_tokens", np.full((1, 3, 8), 1024), "code 1024"),
        ("audio_tokens", np.full((1, 3, 8), -1), "code -1"),
        ("audio_tokens", np.full((1, 3, 8), 0.5, dtype=np.float32), "not a whole number"),
        ("audio_tokens", np.full((1, 3, 8), np.nan, dtype=np.float32), "NaN"),
        ("audio_tokens", np.zeros((1, 3, 8), dtype=np.complex64), "complex64"),
        ("text_tokens", np.zeros((12,), dtype=np.int64), "shape (1, E)"),
        ("text_tokens", np.full((1, 4), 2048), "id 2048"),
        ("lang_code", np.array(3), "lang_code 3"),
        ("lang_code", np.array([2, 2]), "single integer"),
        ("lang_code", np.array(2.5), "not an integer"),
        ("lang_code", np.array("two"), "not an integer"),
    ],
)
def test_bad_values(key: str, value: np.ndarray, needle: str) -> None:
    arrays = _good_arrays()
    arrays[key] = value
    _refused(_npz(**arrays), needle)


def test_pickled_object_array_refused() -> None:
    arrays: dict[str, object] = dict(_good_arrays())
    arrays["text_tokens"] = np.array([[1, 2, {"x": 1}]], dtype=object)  # saved with pickle inside
    _refused(_npz(**arrays), "pickle")


def test_zip_with_garbage_member_refused() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key in ("audio_tokens", "text_tokens", "lang_code"):
            zf.writestr(f"{key}.npy", b"\x93NUMPY garbage")
    _refused(buf.getvalue())


def test_save_load_round_trip_and_digest(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    prompt = Prompt(rng.integers(0, 1024, (1, 40, 8)), rng.integers(5, 70, (1, 9)), "ja")
    path = tmp_path / "voice.npz"
    save_prompt(prompt, path)
    loaded = load_prompt(path)
    np.testing.assert_array_equal(loaded.audio_tokens, prompt.audio_tokens)
    np.testing.assert_array_equal(loaded.text_tokens, prompt.text_tokens)
    assert loaded.language == "ja"
    with np.load(path) as raw:
        assert int(raw["lang_code"]) == LANG_CODES["ja"] == 1
    assert prompt_from_bytes(prompt_to_bytes(prompt), "x").language == "ja"
    # The digest depends on content, not on the dtype the arrays were stored with.
    as32 = Prompt(prompt.audio_tokens.astype(np.int32), prompt.text_tokens.astype(np.int32), "ja")
    assert prompt_digest(as32) == prompt_digest(prompt) == prompt_digest(loaded)
    assert prompt_digest(Prompt(prompt.audio_tokens, prompt.text_tokens, "en")) != prompt_digest(prompt)
    changed = prompt.audio_tokens.copy()
    changed[0, 0, 0] ^= 1
    assert prompt_digest(Prompt(changed, prompt.text_tokens, "ja")) != prompt_digest(prompt)
    assert [p.name for p in tmp_path.iterdir()] == ["voice.npz"]
    assert (path.stat().st_mode & 0o777) == 0o644


def test_atomic_save_leaves_nothing_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    old = Prompt(rng.integers(0, 1024, (1, 5, 8)), rng.integers(5, 70, (1, 3)), "en")
    path = tmp_path / "voice.npz"
    save_prompt(old, path)
    before = path.read_bytes()
    new = Prompt(rng.integers(0, 1024, (1, 50, 8)), rng.integers(5, 70, (1, 3)), "zh")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        save_prompt(new, path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["voice.npz"]  # and no temp file is left
    # An invalid prompt is refused before anything is written.
    with pytest.raises(InvalidArgument):
        save_prompt(Prompt(np.full((1, 2, 8), 5000), new.text_tokens, "zh"), tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        load_prompt(tmp_path / "absent.npz")


def test_prompts_module_is_torch_free() -> None:
    code = "import sys, vallexd.storage.prompts; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_zip_bomb_refused_before_inflating() -> None:
    """A small compressed upload must not unpack into a huge array (daemon memory, AR cache size)."""
    arrays = _good_arrays()
    arrays["audio_tokens"] = np.zeros((1, 2_000_000, 8), dtype=np.int64)  # 128 MB of zeros
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    assert len(data) < 1 << 20  # compresses to a few hundred kB
    _refused(data, "audio_tokens unpacks to")


def test_prompt_length_caps() -> None:
    arrays = _good_arrays()
    arrays["audio_tokens"] = np.zeros((1, 2251, 8), dtype=np.int64)
    _refused(_npz(**arrays), "2251 frames")
    arrays = _good_arrays()
    arrays["text_tokens"] = np.full((1, 1025), 10, dtype=np.int64)
    _refused(_npz(**arrays), "1025 tokens")


# ---------------------------------------------------------------- issue 12, faults 7 and 13


def _npy_header_only(shape: tuple[int, ...], dtype: str = "<i8") -> bytes:
    """A .npy member whose header declares `shape` but which holds (almost) no data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 64


def test_huge_declared_shape_is_refused_before_allocating() -> None:
    # 818-byte upload declaring (1, 2**40, 8) int64 = 64 TiB: MemoryError → INTERNAL before.
    good = _good_arrays()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("audio_tokens.npy", _npy_header_only((1, 2**40, 8)))
        for key in ("text_tokens", "lang_code"):
            member = io.BytesIO()
            np.save(member, good[key])
            zf.writestr(f"{key}.npy", member.getvalue())
    data = buf.getvalue()
    assert len(data) < 2000
    _refused(data, "audio_tokens", "declares shape (1, 1099511627776, 8)", "over the limit")
    # every array is checked, not only audio_tokens; and absurd ranks too
    for key, shape in (("text_tokens", (1, 2**50)), ("lang_code", (2**45,)), ("text_tokens", (1,) * 40)):
        arrays = {k: v for k, v in good.items()}
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for k, v in arrays.items():
                if k == key:
                    zf.writestr(f"{k}.npy", _npy_header_only(shape))
                else:
                    member = io.BytesIO()
                    np.save(member, v)
                    zf.writestr(f"{k}.npy", member.getvalue())
        _refused(buf.getvalue(), key)


def test_whole_float_tokens_are_accepted_as_the_reference_casts_them() -> None:
    good = _good_arrays()
    prompt = prompt_from_bytes(_npz(audio_tokens=good["audio_tokens"].astype(np.float32),
                                    text_tokens=good["text_tokens"].astype(np.float64),
                                    lang_code=np.array(2.0, dtype=np.float32)), "voice.npz")
    np.testing.assert_array_equal(prompt.audio_tokens, good["audio_tokens"])
    assert prompt.audio_tokens.dtype == np.int64 and prompt.language == "en"


@pytest.mark.parametrize("lang_code", [np.array("2"), np.array(b"2"), np.array(2.0), np.array([2]),
                                       np.array([[2]], dtype=np.uint8), np.array(" 2 "), np.array(True + 1)])
def test_lang_code_in_any_form_int_accepts(lang_code: np.ndarray) -> None:
    good = _good_arrays()
    prompt = prompt_from_bytes(_npz(audio_tokens=good["audio_tokens"], text_tokens=good["text_tokens"],
                                    lang_code=lang_code), "voice.npz")
    assert prompt.language == "en"


def test_members_named_without_npy_are_found() -> None:
    good = _good_arrays()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key, value in good.items():
            member = io.BytesIO()
            np.save(member, value)
            zf.writestr(key, member.getvalue())  # no ".npy": numpy reads it, so do we
    assert set(np.load(io.BytesIO(buf.getvalue())).files) == set(good)
    prompt = prompt_from_bytes(buf.getvalue(), "voice.npz")
    np.testing.assert_array_equal(prompt.text_tokens, good["text_tokens"])


def test_reading_a_prompt_never_uses_ast(monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy parses .npy headers with ast.literal_eval; CPython 3.11 shares the AST recursion state
    between threads, so an upload parsed beside the text warm-up failed with "AST constructor
    recursion depth mismatch" (found by bench/reliability.py). Our reader parses headers itself."""
    import ast

    def no_ast(*args: object, **kwargs: object) -> None:
        raise AssertionError("ast used while reading a prompt")

    monkeypatch.setattr(ast, "literal_eval", no_ast)
    monkeypatch.setattr(ast, "parse", no_ast)
    good = _good_arrays()
    prompt = prompt_from_bytes(_npz(**good), "voice.npz")
    np.testing.assert_array_equal(prompt.audio_tokens, good["audio_tokens"])
    fortran = np.asfortranarray(good["audio_tokens"])
    prompt = prompt_from_bytes(_npz(audio_tokens=fortran, text_tokens=good["text_tokens"],
                                    lang_code=good["lang_code"]), "voice.npz")
    np.testing.assert_array_equal(prompt.audio_tokens, good["audio_tokens"])
    _refused(_npz(audio_tokens=np.zeros((1, 3, 8), dtype=[("a", "<i4")]), text_tokens=good["text_tokens"],
                  lang_code=good["lang_code"]), "unsupported .npy header")
