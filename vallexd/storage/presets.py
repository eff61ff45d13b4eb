"""Voice presets (prompt `.npz` files) from the configured folders.

`presets_dirs[0]` is the install dir: the only place `install`/`remove` ever
write.  The other folders (e.g. a shared, read-only catalogue) are only read.
When several folders hold the same name, the earliest folder wins, so an
installed preset shadows a shared one of the same name.

Every file is validated with `prompts.load_prompt` at scan time; a bad file is
logged and skipped rather than stopping the daemon.  The index (name -> path,
Prompt, digest) is swapped as a whole, so readers never see a half-built one.
Blocking file I/O: call the methods off the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vallexd.constants import FRAMES_PER_SECOND
from vallexd.errors import AlreadyExists, NotFound, PermissionDenied, TooLarge, VallexError
from vallexd.service.requests import is_valid_name, validate_name
from vallexd.storage import prompts
from vallexd.storage.cache import os_error
from vallexd.storage.fsutil import atomic_write, fsync_dir, sweep_temp_files
from vallexd.voices.audio import KEPT_AUDIO_SUFFIXES

log = logging.getLogger(__name__)

SUFFIX = ".npz"


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    prompt: prompts.Prompt
    digest: str

    @property
    def folder(self) -> Path:
        return self.path.parent

    def describe(self, install_dir: Path) -> dict[str, Any]:
        frames = self.prompt.num_frames
        return {
            "name": self.name,
            "language": self.prompt.language,
            "frames": frames,
            "duration_s": round(frames / FRAMES_PER_SECOND, 3),
            "text_tokens": int(self.prompt.text_tokens.shape[-1]),
            "source": "installed" if self.folder == install_dir else str(self.folder),
        }


def _stem_name(path: Path) -> str:
    """The preset name of a file: its stem, NFC-normalised (macOS writes names decomposed)."""
    return unicodedata.normalize("NFC", path.name[: -len(SUFFIX)])


class PresetStore:
    def __init__(self, dirs: Sequence[Path], *, max_bytes: int, shared: bool = False) -> None:
        """`shared`: other processes write these folders too (Ray replicas): sweeps spare young temp
        files, and `refresh` notices their installs and removals."""
        if not dirs:
            raise ValueError("at least one presets folder is needed")
        self.dirs = tuple(Path(d) for d in dirs)
        self.max_bytes = max_bytes
        self.shared = shared
        self._index: dict[str, Preset] = {}
        self._seen: tuple[int | None, ...] = ()  # the folders' mtimes when the index was built
        self._lock = threading.Lock()  # serialises install/remove/rescan against each other
        self.skipped: list[str] = []

    @property
    def install_dir(self) -> Path:
        return self.dirs[0]

    # ------------------------------------------------------------------ reading
    def _load(self, path: Path) -> Preset | None:
        name = _stem_name(path)
        try:
            prompt = prompts.load_prompt(path)
        except VallexError as exc:
            log.warning("presets: skipping %s: %s", path, exc.message)
            self.skipped.append(str(path))
            return None
        return Preset(name, path, prompt, prompts.prompt_digest(prompt))

    def _candidates(self, folder: Path) -> list[Path]:
        try:
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it if e.name.endswith(SUFFIX) and e.is_file())
        except FileNotFoundError:
            if folder != self.install_dir:  # the install dir appears on the first install
                log.warning("presets: folder %s does not exist", folder)
            return []
        except OSError as exc:
            log.warning("presets: cannot read folder %s: %s", folder, exc.strerror)
            return []
        paths = []
        for file_name in names:
            stem = file_name[: -len(SUFFIX)]
            if is_valid_name(stem):
                paths.append(folder / file_name)
            else:
                log.warning("presets: ignoring %s: not a valid preset name", folder / file_name)
        return paths

    def rescan(self) -> int:
        """Rebuild the index from disk (at start, SIGHUP); returns the number of presets. Also
        sweeps temp leftovers."""
        with self._lock:
            self._sweep_leftovers()
            return self._reindex()

    def refresh(self) -> bool:
        """Re-read the folders if one changed since the index was built (an install, removal or
        rename by another process changes the folder's mtime); True if it did. One stat per folder;
        two requests that notice the same change re-read once."""
        if self._folder_stamps() == self._seen:
            return False
        with self._lock:
            if self._folder_stamps() == self._seen:  # another thread re-read it meanwhile
                return False
            self._reindex()
        return True

    def _reindex(self) -> int:
        """Load every preset of the folders into a new index (with `_lock` held)."""
        self._seen = self._folder_stamps()
        self.skipped = []
        index: dict[str, Preset] = {}
        for folder in self.dirs:
            for path in self._candidates(folder):
                name = _stem_name(path)
                if name in index:  # an earlier folder wins
                    continue
                preset = self._load(path)
                if preset is not None:
                    index[name] = preset
        self._index = index
        log.info("presets: %d loaded from %s", len(index), ", ".join(map(str, self.dirs)))
        return len(index)

    def _folder_stamps(self) -> tuple[int | None, ...]:
        stamps = []
        for folder in self.dirs:
            try:
                stamps.append(os.stat(folder).st_mtime_ns)
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _sweep_leftovers(self) -> None:
        """Remove temp files a crash in `fsutil.atomic_write` (via `save_prompt`) left in the install dir."""
        removed = sweep_temp_files(self.install_dir, ".", ".tmp", shared=self.shared)
        if removed:
            log.info("presets: removed %d leftover temp file(s) in %s", removed, self.install_dir)

    def __len__(self) -> int:
        return len(self._index)

    def get(self, name: str) -> Preset:
        name = validate_name(name, "voice")
        preset = self._index.get(name)
        if preset is None:
            raise NotFound(f"voice {name!r} not found", reason="PRESET_NOT_FOUND", details={"name": name})
        return preset

    def listing(self) -> list[dict[str, Any]]:
        index = self._index
        return [index[name].describe(self.install_dir) for name in sorted(index)]

    # ------------------------------------------------------------------ writing
    def install(self, name: str, data: bytes, *, overwrite: bool = False) -> Preset:
        """Validate the bytes, then write them atomically into the install dir."""
        name = validate_name(name)
        if len(data) > self.max_bytes:
            raise TooLarge(f"preset upload of {len(data)} bytes exceeds the limit of {self.max_bytes} bytes",
                           reason="UPLOAD_TOO_LARGE", details={"limit": self.max_bytes})
        # Parse first: a corrupt upload is refused before anything touches the disk.
        return self.install_prompt(name, prompts.prompt_from_bytes(data, name), overwrite=overwrite)

    def install_prompt(self, name: str, prompt: prompts.Prompt, *, overwrite: bool = False,
                       audio: tuple[bytes, str] | None = None) -> Preset:
        """Write a validated prompt (and, if given, its recording: (bytes, suffix such as ".wav"))
        atomically into the install dir; AlreadyExists unless `overwrite`.

        The recording is written first and removed again if the prompt cannot be written, so a
        failure leaves neither. A replaced preset loses the recording kept with its old version.
        """
        validate_name(name)
        path = self.install_dir / f"{name}{SUFFIX}"
        with self._lock:
            if not overwrite and (name in self._index or path.exists()):
                raise AlreadyExists(f"voice {name!r} already exists; set overwrite to replace it",
                                    reason="PRESET_EXISTS", details={"name": name})
            kept = self.install_dir / f"{name}{audio[1]}" if audio is not None else None
            try:
                self.install_dir.mkdir(parents=True, exist_ok=True)
                if audio is not None and kept is not None:
                    atomic_write(kept, audio[0], mode=0o644)
                # Write the canonical re-encoding, so the file on disk is exactly what was validated
                # (no extra arrays riding along in the upload).
                prompts.save_prompt(prompt, path)
            except OSError as exc:
                if kept is not None:
                    with contextlib.suppress(OSError):
                        kept.unlink()
                raise os_error(exc, f"install voice {name!r} in {self.install_dir}",
                               "PRESET_WRITE_FAILED") from None
            self._remove_kept_audio(name, keep=kept)
            preset = Preset(name, path, prompt, prompts.prompt_digest(prompt))
            self._index = {**self._index, name: preset}
        log.info("presets: installed %r (%d frames, %s)", name, prompt.num_frames, prompt.language)
        return preset

    def kept_audio(self, name: str) -> Path | None:
        """The recording kept beside an installed preset (presets.create with keep_audio), if any."""
        for suffix in KEPT_AUDIO_SUFFIXES:
            candidate = self.install_dir / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
        return None

    def _remove_kept_audio(self, name: str, keep: Path | None = None) -> None:
        for suffix in KEPT_AUDIO_SUFFIXES:
            candidate = self.install_dir / f"{name}{suffix}"
            if candidate != keep:
                with contextlib.suppress(FileNotFoundError):
                    candidate.unlink()

    def remove(self, name: str) -> None:
        """Delete an installed preset; a shadowed one from another folder becomes visible again."""
        name = validate_name(name)
        with self._lock:
            preset = self._index.get(name)
            # The file may be spelled decomposed on disk (copied from macOS): remove that one.
            path = preset.path if preset is not None else self.install_dir / f"{name}{SUFFIX}"
            if preset is None and not path.exists():
                raise NotFound(f"voice {name!r} not found", reason="PRESET_NOT_FOUND", details={"name": name})
            if preset is not None and preset.folder != self.install_dir:
                raise PermissionDenied(
                    f"voice {name!r} comes from the read-only folder {preset.folder}; only presets in "
                    f"{self.install_dir} can be removed",
                    reason="READ_ONLY_PRESET",
                    details={"name": name},
                )
            try:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                self._remove_kept_audio(name)
                fsync_dir(self.install_dir)
            except OSError as exc:
                raise os_error(exc, f"remove voice {name!r} from {self.install_dir}",
                               "PRESET_WRITE_FAILED") from None
            index = {k: v for k, v in self._index.items() if k != name}
            for folder in self.dirs[1:]:
                # Compare NFC names: the file may be spelled decomposed on disk.
                found = [p for p in self._candidates(folder) if _stem_name(p) == name]
                if found and (shadowed := self._load(found[0])) is not None:
                    index[name] = shadowed
                    break
            self._index = index
        log.info("presets: removed %r", name)
