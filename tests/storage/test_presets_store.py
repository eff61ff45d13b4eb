"""Preset store: shared presets load (incl. Y'shtola), install/remove, bad names, corrupt uploads."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest

from vallexd.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, TooLarge
from vallexd.storage.presets import PresetStore
from vallexd.storage.prompts import Prompt, prompt_digest, prompt_to_bytes


def small_prompt(frames: int = 5, seed: int = 0, language: str = "en") -> Prompt:
    rng = np.random.default_rng(seed)
    return Prompt(audio_tokens=rng.integers(0, 1024, (1, frames, 8)), text_tokens=rng.integers(0, 70, (1, 3)),
                  language=language)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shared_presets_load(tmp_path: Path, shared_presets_dir: Path) -> None:
    dirs = [tmp_path / "installed", shared_presets_dir / "finetuned", shared_presets_dir / "upstream"]
    store = PresetStore(dirs, max_bytes=1 << 20)
    assert store.rescan() == 53 and store.skipped == []
    yshtola = store.get("Y'shtola-Finetuned")
    assert yshtola.path == shared_presets_dir / "finetuned" / "Y'shtola-Finetuned.npz"
    assert yshtola.prompt.language == "ja" and len(yshtola.digest) == 64
    listed = {p["name"]: p for p in store.listing()}
    assert len(listed) == 53
    entry = listed["Y'shtola-Finetuned"]
    assert entry["source"] == str(shared_presets_dir / "finetuned")
    assert entry["frames"] == yshtola.prompt.num_frames
    assert entry["duration_s"] == round(entry["frames"] / 75, 3)
    assert entry["text_tokens"] == yshtola.prompt.text_tokens.shape[1]
    assert store.get("acou_1").prompt.audio_tokens.shape[2] == 8
    with pytest.raises(NotFound) as info:
        store.get("nobody")
    assert info.value.reason == "PRESET_NOT_FOUND" and info.value.message == "voice 'nobody' not found"


def test_install_overwrite_remove(tmp_path: Path) -> None:
    install = tmp_path / "installed"
    store = PresetStore([install], max_bytes=1 << 20)
    store.rescan()
    first, second = small_prompt(seed=1), small_prompt(seed=2, language="zh")
    preset = store.install("My voice-1.0", prompt_to_bytes(first))
    assert preset.path == install / "My voice-1.0.npz" and preset.digest == prompt_digest(first)
    assert store.listing()[0]["source"] == "installed"
    with pytest.raises(AlreadyExists):
        store.install("My voice-1.0", prompt_to_bytes(second))
    assert store.get("My voice-1.0").digest == prompt_digest(first)
    store.install("My voice-1.0", prompt_to_bytes(second), overwrite=True)
    assert store.get("My voice-1.0").prompt.language == "zh"
    # The index survives a rescan (it was written to disk, not just remembered).
    fresh = PresetStore([install], max_bytes=1 << 20)
    fresh.rescan()
    assert fresh.get("My voice-1.0").digest == prompt_digest(second)
    store.remove("My voice-1.0")
    assert not (install / "My voice-1.0.npz").exists() and len(store) == 0
    with pytest.raises(NotFound):
        store.remove("My voice-1.0")


def test_installed_shadows_shared_and_shared_is_read_only(tmp_path: Path) -> None:
    install, shared = tmp_path / "installed", tmp_path / "shared"
    shared.mkdir()
    (shared / "alice.npz").write_bytes(prompt_to_bytes(small_prompt(seed=1)))
    store = PresetStore([install, shared], max_bytes=1 << 20)
    store.rescan()
    with pytest.raises(PermissionDenied) as info:
        store.remove("alice")
    assert info.value.reason == "READ_ONLY_PRESET" and (shared / "alice.npz").exists()
    with pytest.raises(AlreadyExists):
        store.install("alice", prompt_to_bytes(small_prompt(seed=2)))
    store.install("alice", prompt_to_bytes(small_prompt(seed=2)), overwrite=True)
    assert store.get("alice").path.parent == install
    store.remove("alice")  # the installed copy goes; the shared one shows again
    assert store.get("alice").path.parent == shared
    assert store.get("alice").digest == prompt_digest(small_prompt(seed=1))


BAD_NAMES = ["../../etc/passwd", "a/b", "", "x" * 65, ".hidden", "..", "a\\b", "a\0b", "a\nb", " lead",
             "trail ", "semi;colon", "star*"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_refused_and_nothing_written(tmp_path: Path, name: str) -> None:
    store = PresetStore([tmp_path / "installed"], max_bytes=1 << 20)
    before = tree(tmp_path)
    with pytest.raises(InvalidArgument) as info:
        store.install(name, prompt_to_bytes(small_prompt()))
    assert info.value.reason == "BAD_NAME"
    with pytest.raises(InvalidArgument):
        store.remove(name)
    with pytest.raises(InvalidArgument):
        store.get(name)
    assert tree(tmp_path) == before


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


GOOD = prompt_to_bytes(small_prompt())
ZERO_TEXT = np.zeros((1, 3), np.int64)
CORRUPT = {
    "random bytes": b"\x00garbage" * 50,
    "truncated zip": GOOD[: len(GOOD) // 2],
    "missing lang_code": _npz(audio_tokens=np.zeros((1, 5, 8), np.int64), text_tokens=ZERO_TEXT),
    "wrong shape": _npz(audio_tokens=np.zeros((5, 8), np.int64), text_tokens=np.zeros((1, 3), np.int64),
                        lang_code=np.array(2)),
    "code out of range": _npz(audio_tokens=np.full((1, 5, 8), 5000), text_tokens=np.zeros((1, 3), np.int64),
                              lang_code=np.array(2)),
    "pickled object": _npz(audio_tokens=np.array([object()], dtype=object), text_tokens=np.zeros((1, 3)),
                           lang_code=np.array(2)),
    "float codes": _npz(audio_tokens=np.full((1, 5, 8), 0.5), text_tokens=np.zeros((1, 3), np.int64),
                        lang_code=np.array(2)),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_upload_refused_and_nothing_written(tmp_path: Path, case: str) -> None:
    store = PresetStore([tmp_path / "installed"], max_bytes=1 << 20)
    store.rescan()
    with pytest.raises(InvalidArgument) as info:
        store.install("victim", CORRUPT[case])
    assert info.value.reason == "BAD_PROMPT" and "victim" in info.value.message
    assert tree(tmp_path) == {} and len(store) == 0


def test_upload_size_limit(tmp_path: Path) -> None:
    store = PresetStore([tmp_path / "installed"], max_bytes=100)
    with pytest.raises(TooLarge):
        store.install("big", GOOD)
    assert tree(tmp_path) == {}


def test_bad_files_skipped_and_leftovers_swept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    install = tmp_path / "installed"
    install.mkdir()
    (install / "good.npz").write_bytes(GOOD)
    (install / "broken.npz").write_bytes(b"not a zip")
    (install / ".sneaky.npz").write_bytes(GOOD)  # not a valid name: ignored, never loaded
    (install / "notes.txt").write_text("ignored")
    (install / ".good.npz.abc123.tmp").write_bytes(GOOD[:10])  # a crashed atomic write
    store = PresetStore([install, tmp_path / "missing"], max_bytes=1 << 20)
    with caplog.at_level(logging.WARNING, logger="vallexd.storage.presets"):
        assert store.rescan() == 1
    assert [p["name"] for p in store.listing()] == ["good"]
    assert store.skipped == [str(install / "broken.npz")]
    assert "broken.npz" in caplog.text and "does not exist" in caplog.text
    assert not (install / ".good.npz.abc123.tmp").exists()


def test_write_failures_are_typed(tmp_path: Path) -> None:
    from vallexd.errors import Unavailable

    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"x")
    store = PresetStore([blocker / "installed"], max_bytes=1 << 20)  # mkdir fails: ENOTDIR
    with pytest.raises(Unavailable) as info:
        store.install("voice", prompt_to_bytes(small_prompt()))
    assert info.value.reason == "PRESET_WRITE_FAILED"

    install = tmp_path / "installed"
    (install / "stuck.npz").mkdir(parents=True)  # unlink of a folder fails: EISDIR
    store = PresetStore([install], max_bytes=1 << 20)
    with pytest.raises(Unavailable) as info:
        store.remove("stuck")
    assert info.value.reason == "PRESET_WRITE_FAILED"


# ---------------------------------------------------------------- issue 12, fault 4: NFC names


def test_decomposed_names_are_one_name_everywhere(tmp_path: Path) -> None:
    import unicodedata

    nfc, nfd = "Tugão", unicodedata.normalize("NFD", "Tugão")
    assert nfc != nfd and len(nfd) == 6
    # A file copied from macOS sits in a presets folder with a decomposed name.
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / f"{nfd}.npz").write_bytes(prompt_to_bytes(small_prompt(seed=3)))
    store = PresetStore([tmp_path / "installed", shared], max_bytes=1 << 20)
    assert store.rescan() == 1
    assert [p["name"] for p in store.listing()] == [nfc]
    assert store.get(nfd) is store.get(nfc)
    # install with the decomposed spelling: stored and listed under the composed one
    preset = store.install(nfd, prompt_to_bytes(small_prompt(seed=4)), overwrite=True)
    assert preset.name == nfc and preset.path.name == f"{nfc}.npz"
    assert store.get(nfd).path == tmp_path / "installed" / f"{nfc}.npz"
    store.remove(nfd)
    assert store.get(nfc).folder == shared  # the shadowed one is back


def test_bad_name_error_names_the_offending_code_point() -> None:
    from vallexd.service.requests import validate_name

    for name, needle in [("Tug\u200bão", "U+200B ZERO WIDTH SPACE"), ("a/b", "U+002F SOLIDUS"),
                         ("x\u00a0y", "U+00A0 NO-BREAK SPACE")]:
        with pytest.raises(InvalidArgument) as info:
            validate_name(name)
        assert needle in info.value.message and info.value.reason == "BAD_NAME"
