"""The model files vallexd needs, where they come from, and how we know they are intact.

The EnCodec weights publish part of their digest (the first 8 hex digits of
the sha256 are in the file name) and Whisper's checkpoints all of it (the
sha256 is a folder of their URL, as openai-whisper checks it).  For the others we record the
sha256 at the first download in `manifest.json` in the models folder
(trust on first use) and check every later fetch and `models verify`
against it, so a corrupted or swapped file is noticed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vallexctl.download import DigestMismatch, Progress, check_digest, download
from vallexd.constants import WHISPER_DEFAULT_SIZE, WHISPER_DIR
from vallexd.errors import InvalidArgument, NotFound
from vallexd.storage import fsutil
from vallexd.storage.fsutil import sha256_file

BASE_URL_ENV = "VALLEXCTL_MODELS_BASE_URL"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ModelFile:
    key: str
    relpath: str  # inside the models folder; also the path under a mirror's --base-url
    url: str  # the public origin
    sha256_prefix: str | None = None
    required: bool = True  # EnCodec is only needed for `preset install --from-audio`
    about: str = ""
    sha256: str | None = None  # published full digest (Whisper)

    def source(self, base_url: str | None) -> str:
        return f"{base_url.rstrip('/')}/{self.relpath}" if base_url else self.url


MODEL_FILES: tuple[ModelFile, ...] = (
    ModelFile("checkpoint", "vallex-checkpoint.pt",
              "https://huggingface.co/Plachta/VALL-E-X/resolve/main/vallex-checkpoint.pt",
              about="VALL-E X checkpoint (about 1.5 GB)"),
    ModelFile("vocos-config", "vocos-encodec-24khz/config.yaml",
              "https://huggingface.co/charactr/vocos-encodec-24khz/resolve/main/config.yaml",
              about="Vocos vocoder config"),
    ModelFile("vocos-weights", "vocos-encodec-24khz/pytorch_model.bin",
              "https://huggingface.co/charactr/vocos-encodec-24khz/resolve/main/pytorch_model.bin",
              about="Vocos vocoder weights (about 30 MB)"),
    ModelFile("encodec", "encodec_24khz-d7cc33bc.th",
              "https://dl.fbaipublicfiles.com/encodec/v0/encodec_24khz-d7cc33bc.th",
              sha256_prefix="d7cc33bc", required=False,
              about="EnCodec 24 kHz weights (about 90 MB; for presets made from audio)"),
)
ENCODEC = MODEL_FILES[3]

#: openai-whisper's multilingual checkpoints (the English-only ones cannot detect zh/ja): size ->
#: the sha256 that is also a folder of its URL (openai-whisper's own _MODELS table).
WHISPER_SHA256: dict[str, str] = {
    "tiny": "65147644a518d12f04e32d6f3b26facc3f8dd46e5390956a9424a650c0ce22b9",
    "base": "ed3a0b6b1c0edf879ad9b11b1af5a0e6ab5db9205f891f668f8b0e6c6326e34e",
    "small": "9ecf779972d90ba49c06d968637d720dd632c55bbf19d441fb42bf17a411e794",
    "medium": "345ae4da62f9b3d59415adc60127b97c714f32e89e936602e85993674d08dcb1",
    "large-v3": "e5b1a55b89c1367dacf97e3e19bfd829a01529dbfdeefa8caeb59b3f1b81dadb",
    "large-v3-turbo": "aff26ae408abcba5fbf8813c21e62b0941638c5f6eebfb145be0c9839262a19a",
}
WHISPER_SIZES_MB = {"tiny": 75, "base": 145, "small": 485, "medium": 1500, "large-v3": 3000,
                    "large-v3-turbo": 1600}


def whisper_file(size: str = WHISPER_DEFAULT_SIZE) -> ModelFile:
    """The Whisper checkpoint of `size` as <models>/whisper/<size>.pt (the daemon's `whisper` default
    is medium, the reference's choice)."""
    if size not in WHISPER_SHA256:
        raise InvalidArgument(f"unknown Whisper size {size!r}; use one of {', '.join(WHISPER_SHA256)}",
                              reason="BAD_VALUE")
    digest = WHISPER_SHA256[size]
    return ModelFile(f"whisper-{size}", f"{WHISPER_DIR}/{size}.pt",
                     f"https://openaipublic.azureedge.net/main/whisper/models/{digest}/{size}.pt",
                     required=False, sha256=digest,
                     about=f"Whisper {size} (about {WHISPER_SIZES_MB[size]} MB; transcribes recordings)")


def whisper_files_present(models_dir: Path) -> tuple[ModelFile, ...]:
    return tuple(mf for size in WHISPER_SHA256 if (models_dir / (mf := whisper_file(size)).relpath).is_file())


#: The demo weights of `quickstart --demo` live beside the models folder, marked by this file.
DEMO_DIR_NAME = "tiny-demo"
DEMO_MARKER = "DEMO-WEIGHTS.txt"
_DEMO_TEXT = ("Tiny RANDOM weights made by `vallexctl quickstart --demo`: they exercise the whole path, "
              "but the audio they produce is noise. `vallexctl models fetch` gets the real ones.\n")


def demo_dir(models_dir: Path) -> Path:
    """Where `quickstart --demo` keeps its weights: beside the models folder."""
    return models_dir.parent / DEMO_DIR_NAME


def is_demo(folder: Path) -> bool:
    """True for a folder of demo weights (its marker file is there)."""
    return (folder / DEMO_MARKER).is_file()


def make_demo(folder: Path) -> None:
    """Tiny random weights in the real formats, marked as demo weights (imports torch: seconds)."""
    from vallexd.tools.tiny_weights import make_tiny

    make_tiny(folder)
    fsutil.atomic_write(folder / DEMO_MARKER, _DEMO_TEXT.encode(), mode=None)


def files_help() -> str:
    """The files `models fetch` gets and their public URLs, for `--help` (one block, no wrapping)."""
    lines = ["\b", "Files (into DIR; with --base-url URL from URL/<file>):"]
    for mf in MODEL_FILES:
        lines.append(f"  {mf.relpath}  {mf.about}{'' if mf.required else ' [optional]'}")
        lines.append(f"    {mf.url}")
    return "\n".join(lines)


def base_url_from(flag: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    url = flag or env.get(BASE_URL_ENV) or None
    if url is not None and not url.startswith(("http://", "https://")):
        raise InvalidArgument(f"--base-url must be an http(s) URL, got {url!r}", reason="BAD_URL")
    return url


# --------------------------------------------------------------------------- manifest


def read_manifest(models_dir: Path) -> dict[str, dict[str, Any]]:
    path = models_dir / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read {path}: {exc}; fix or delete it", reason="BAD_MANIFEST") from None
    files = data.get("files") if isinstance(data, dict) else None
    return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def write_manifest(models_dir: Path, files: dict[str, dict[str, Any]]) -> None:
    """Atomic write: a crash leaves the old manifest or the new one, never half of one."""
    body = json.dumps({"version": 1, "files": files}, indent=2, sort_keys=True) + "\n"
    fsutil.atomic_write(models_dir / MANIFEST, body.encode("utf-8"), prefix=".manifest.")


# --------------------------------------------------------------------------- fetch / verify


@dataclass(frozen=True)
class FileReport:
    relpath: str
    status: str  # "downloaded", "present", "missing", "ok", "mismatch", "recorded"
    sha256: str | None = None
    size: int | None = None
    detail: str = ""
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"file": self.relpath, "status": self.status, "sha256": self.sha256, "size": self.size,
                "detail": self.detail, "resumed": self.resumed}


def fetch_models(
    models_dir: Path,
    *,
    base_url: str | None = None,
    include_optional: bool = True,
    progress_for: Callable[[ModelFile], Progress | None] | None = None,
    hash_progress_for: Callable[[ModelFile], Progress | None] | None = None,
    retries: int = 2,
    files: Sequence[ModelFile] | None = None,
) -> list[FileReport]:
    """Download what is missing, check what is there; the manifest pins every digest.

    `files` picks the files (e.g. `[ENCODEC, whisper_file("medium")]`); by default MODEL_FILES,
    the optional ones only with `include_optional`.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(models_dir)
    reports: list[FileReport] = []
    chosen = MODEL_FILES if files is None else tuple(files)
    for mf in chosen:
        if files is None and not mf.required and not include_optional:
            continue
        dest = models_dir / mf.relpath
        pinned = manifest.get(mf.relpath, {}).get("sha256") or mf.sha256
        if dest.is_file():
            actual = sha256_file(dest, hash_progress_for(mf) if hash_progress_for else None)
            try:
                check_digest(actual, sha256=pinned, sha256_prefix=mf.sha256_prefix, what=str(dest))
            except DigestMismatch as exc:
                exc.message += "; the file is damaged or was replaced: delete it and fetch again"
                exc.args = (exc.message,)
                raise
            if mf.relpath not in manifest:
                manifest[mf.relpath] = _pin(actual, dest.stat().st_size, "(already present)")
                write_manifest(models_dir, manifest)
            reports.append(FileReport(mf.relpath, "present", actual, dest.stat().st_size))
            continue
        url = mf.source(base_url)
        try:
            result = download(url, dest, sha256=pinned, sha256_prefix=mf.sha256_prefix,
                              progress=progress_for(mf) if progress_for else None, retries=retries)
        except NotFound as exc:
            raise NotFound(f"{exc.message}; {_in_place(reports)}; check the URL"
                           f"{' (a mirror must serve URL/' + mf.relpath + ')' if base_url else ''} and run "
                           "`vallexctl models fetch` again", reason=exc.reason) from None
        except DigestMismatch as exc:
            if pinned is not None and mf.relpath not in manifest:
                exc.message += " (the digest its publisher gives for this file)"
                exc.args = (exc.message,)
            elif pinned is not None:
                exc.message += (
                    f" (the digest recorded at the first download in {models_dir / MANIFEST}; "
                    "if the upstream file really changed, delete its entry there and fetch again)"
                )
                exc.args = (exc.message,)
            raise
        if mf.relpath not in manifest:
            manifest[mf.relpath] = _pin(result.sha256, result.size, url)
            write_manifest(models_dir, manifest)
        reports.append(FileReport(mf.relpath, "downloaded", result.sha256, result.size, url, result.resumed))
    return reports


def verify_models(
    models_dir: Path, *, hash_progress_for: Callable[[ModelFile], Progress | None] | None = None
) -> list[FileReport]:
    """Hash every file and compare with the manifest (and EnCodec's name prefix); changes nothing."""
    manifest = read_manifest(models_dir)
    reports: list[FileReport] = []
    for mf in (*MODEL_FILES, *whisper_files_present(models_dir)):
        dest = models_dir / mf.relpath
        if not dest.is_file():
            reports.append(FileReport(mf.relpath, "missing", detail="" if mf.required else "optional"))
            continue
        actual = sha256_file(dest, hash_progress_for(mf) if hash_progress_for else None)
        pinned = manifest.get(mf.relpath, {}).get("sha256") or mf.sha256
        try:
            check_digest(actual, sha256=pinned, sha256_prefix=mf.sha256_prefix, what=mf.relpath)
        except DigestMismatch as exc:
            reports.append(FileReport(mf.relpath, "mismatch", actual, dest.stat().st_size, exc.message))
            continue
        status = "ok" if pinned or mf.sha256_prefix else "unpinned"
        detail = "" if pinned else "no digest recorded yet (run `vallexctl models fetch` to record it)"
        reports.append(FileReport(mf.relpath, status, actual, dest.stat().st_size, detail))
    return reports


def _in_place(reports: list[FileReport]) -> str:
    done = [r.relpath for r in reports]
    return f"already in place: {', '.join(done)}" if done else "no file is in place yet"


def models_present(models_dir: Path) -> bool:
    return all((models_dir / mf.relpath).is_file() for mf in MODEL_FILES if mf.required)


def _pin(sha256: str, size: int, source: str) -> dict[str, Any]:
    return {"sha256": sha256, "size": size, "source": source,
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
