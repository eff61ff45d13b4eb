"""`vallexctl presets ...`: list, install (file, URL, catalogue name, or from audio), remove."""

from __future__ import annotations

import os
import re
import shlex
import tempfile
import urllib.parse
from pathlib import Path

import click

from vallexctl import catalogue as cat
from vallexctl.context import state
from vallexctl.download import DownloadFailed, download
from vallexctl.output import ProgressLine, emit, json_option, stderr_is_tty
from vallexctl.units import format_size
from vallexd.constants import MAX_PROMPT_SECONDS
from vallexd.errors import NotFound, TooLarge

#: Largest .npz we download for a preset (the published ones are < 100 KB; the daemon's own
#: upload limit is 4 MiB by default). Stops a wrong URL from filling the disk.
MAX_PRESET_DOWNLOAD = 16 * 1024 * 1024


@click.group("presets")
def presets() -> None:
    """Voice presets: list, install, remove (`preset` works as well)."""


@presets.command("list")
@click.option("--available", is_flag=True, help="List the catalogue of installable presets instead.")
@click.option("--catalogue", "catalogue_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar=cat.ENV_VAR, help=f"Catalogue file [env {cat.ENV_VAR}].")
@json_option
def presets_list(available: bool, catalogue_path: Path | None) -> None:
    """Presets the daemon has installed (or, with --available, those it can install)."""
    if available:
        entries = cat.load_catalogue(catalogue_path)
        rows = [e.to_json() for e in entries]

        def human_catalogue() -> None:
            for e in entries:
                click.echo(f"{e.name:24} {e.language:3} {e.description}")

        emit({"presets": rows}, human_catalogue)
        return

    with state().client() as c:
        result = c.call("presets.list")

    def human() -> None:
        items = result.get("presets") or []
        if not items:
            click.echo("no presets installed; try `vallexctl presets list --available`", err=True)
        for p in items:
            click.echo(f"{p.get('name', '?'):24} {p.get('language', '?'):3} "
                       f"{float(p.get('duration_s') or 0):5.1f} s  {p.get('source', '')}")

    emit(result, human)


@presets.command("install")
@click.argument("source", required=False)
@click.option("--name", help="Install under this name [default: from the source].")
@click.option("--overwrite", is_flag=True, help="Replace an installed preset of the same name.")
@click.option("--sha256", "expected_sha256", metavar="HEX", help="Expected digest of a downloaded URL.")
@click.option("--catalogue", "catalogue_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar=cat.ENV_VAR, help=f"Catalogue file [env {cat.ENV_VAR}].")
@click.option("--from-audio", "from_audio", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Make the preset from a recording (WAV, FLAC, MP3, ...; at most 15 s) instead.")
@click.option("--transcript", help="What is said in the --from-audio recording [default: the daemon "
                                   "transcribes it with Whisper].")
@click.option("-l", "--language", type=click.Choice(("auto", "en", "zh", "ja")), default="auto",
              show_default=True, help="Language of the transcript (--from-audio).")
@click.option("--encodec", "encodec_path", type=click.Path(dir_okay=False, path_type=Path),
              help="EnCodec 24 kHz weights: make the preset here [default: here if the models folder "
                   "has them and a transcript is given, else on the daemon].")
@click.option("--save", "save_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also keep the .npz made --from-audio here (needs EnCodec on this machine).")
@click.option("--keep-audio", is_flag=True, help="The daemon keeps the recording beside the preset "
                                                  "(when it makes the preset).")
@click.option("--progress/--no-progress", default=None,
              help="Show download progress on stderr [default: on a terminal].")
@json_option
def presets_install(source: str | None, name: str | None, overwrite: bool, expected_sha256: str | None,
                    catalogue_path: Path | None, from_audio: Path | None, transcript: str | None,
                    language: str, encodec_path: Path | None, save_path: Path | None, keep_audio: bool,
                    progress: bool | None) -> None:
    """Install a preset from SOURCE: an .npz file, an http(s) URL, or a catalogue name.

    \b
    vallexctl preset install paimon                     (from the catalogue)
    vallexctl preset install ./me.npz --name me
    vallexctl preset install https://example.org/x.npz --sha256 HEX
    vallexctl preset install --from-audio me.wav --transcript "Hello there." --name me
    vallexctl preset install --from-audio me.m4a --name me   (the daemon transcribes it)
    """
    from vallexd.service.requests import validate_name

    if expected_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", expected_sha256):
        # Before any download: a digest that cannot match would only be noticed after it.
        raise click.UsageError(f"--sha256 must be 64 hex digits (a sha256 digest), got {expected_sha256!r}")
    if from_audio is not None:
        if source is not None:
            raise click.UsageError("give either SOURCE or --from-audio, not both")
        if not name:
            raise click.UsageError("--from-audio needs --name NAME")
        name = validate_name(name)
        from vallexctl.from_audio import default_encodec_path, prompt_bytes_from_audio

        local = encodec_path is not None or (bool(transcript) and default_encodec_path().is_file())
        if not local:
            if save_path is not None:
                raise click.UsageError("--save needs the EnCodec weights on this machine: pass --encodec "
                                       "PATH or run `vallexctl models fetch --encodec`")
            _create_on_daemon(from_audio, name, transcript, language, overwrite, keep_audio)
            return
        if not transcript:
            raise click.UsageError("--encodec makes the preset here, which needs --transcript TEXT "
                                   "(without --encodec the daemon can transcribe the recording)")

        data = prompt_bytes_from_audio(from_audio, transcript, language, encodec_path=encodec_path,
                                       max_seconds=MAX_PROMPT_SECONDS)
        if save_path is not None:
            from vallexctl.output import write_file_atomic

            write_file_atomic(save_path, data)
        origin = str(from_audio)
    elif source is None:
        raise click.UsageError("give SOURCE (an .npz file, an http(s) URL or a catalogue name) "
                               "or --from-audio")
    else:
        show = stderr_is_tty() if progress is None else progress
        data, default_name, origin = _fetch_source(source, expected_sha256, catalogue_path, show)
        name = validate_name(name or default_name)


    with state().client() as c:
        result = c.call("presets.install", {"name": name, "data": data, "overwrite": overwrite})
    result.setdefault("name", name)
    result["source"] = origin
    result["bytes"] = len(data)
    emit(result, f"installed {result['name']} ({result.get('language', '?')}, "
                 f"{result.get('frames', '?')} frames) from {origin}")


@presets.command("remove")
@click.argument("name")
@json_option
def presets_remove(name: str) -> None:
    """Remove an installed preset."""
    from vallexd.service.requests import validate_name

    name = validate_name(name)
    with state().client() as c:
        result = c.call("presets.remove", {"name": name})
    emit(result, f"removed {result.get('name', name)}")


def _create_on_daemon(recording: Path, name: str, transcript: str | None, language: str, overwrite: bool,
                      keep_audio: bool) -> None:
    """Send the recording to the daemon's presets.create (its EnCodec; Whisper without a transcript)."""
    from vallexctl.from_audio import read_recording

    params = {"name": name, "audio": read_recording(recording, MAX_PROMPT_SECONDS), "language": language,
              "overwrite": overwrite, "keep_audio": keep_audio}
    if transcript:
        params["transcript"] = transcript
    with state().client() as c:
        result = c.call("presets.create", params)
    result["source"] = str(recording)
    how = "transcribed by Whisper" if result.get("transcribed") else "given"
    emit(result, f"made {result.get('name', name)} ({result.get('language', '?')}, "
                 f"{result.get('frames', '?')} frames) from {recording} on the daemon; transcript "
                 f"({how}): {result.get('transcript', '')}")


def _fetch_source(source: str, expected_sha256: str | None, catalogue_path: Path | None,
                  show: bool) -> tuple[bytes, str, str]:
    """(npz bytes, default preset name, where they came from) for a file, URL or catalogue name."""
    if source.startswith(("http://", "https://")):
        stem = Path(urllib.parse.unquote(urllib.parse.urlsplit(source).path)).name
        stem = stem[:-4] if stem.lower().endswith(".npz") else stem
        return _download_npz(source, expected_sha256, show), stem, source
    path = Path(source).expanduser()
    if path.is_file():
        if path.stat().st_size > MAX_PRESET_DOWNLOAD:
            raise TooLarge(f"{path} is {format_size(path.stat().st_size)}: not a voice preset",
                           reason="PRESET_TOO_LARGE")
        data = path.read_bytes()
        if expected_sha256 is not None:
            import hashlib

            from vallexctl.download import check_digest

            check_digest(hashlib.sha256(data).hexdigest(), sha256=expected_sha256, sha256_prefix=None,
                         what=str(path))
        stem = path.name[:-4] if path.name.lower().endswith(".npz") else path.name
        return data, stem, str(path.resolve())
    if source.lower().endswith(".npz") or os.sep in source:
        raise NotFound(f"no such file: {source}", reason="NO_SUCH_FILE")
    entries = cat.load_catalogue(catalogue_path)
    entry = cat.lookup(source, entries)
    if entry is None:
        raise NotFound(
            f"{source!r} is not a file, a URL or a preset in the catalogue; "
            "see `vallexctl presets list --available`", reason="NOT_IN_CATALOGUE",
        )
    try:
        data = _download_npz(entry.url, expected_sha256 or entry.sha256, show)
    except DownloadFailed as exc:
        raise DownloadFailed(f"{exc.message}; or download {entry.url} elsewhere and install the file with "
                             f"`vallexctl preset install FILE.npz --name {shlex.quote(entry.name)}`",
                             reason=exc.reason) from None
    return data, entry.name, entry.url


def _download_npz(url: str, sha256: str | None, show: bool) -> bytes:
    """Download into a private temp dir that is always removed: a refused file leaves nothing."""
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or url
    progress = ProgressLine(name, enabled=show)
    with tempfile.TemporaryDirectory(prefix="vallexctl-") as tmp:
        result = download(url, Path(tmp) / "preset.npz", sha256=sha256, progress=progress,
                          max_bytes=MAX_PRESET_DOWNLOAD)
        return result.path.read_bytes()


def register(cli: click.Group) -> None:
    cli.add_command(presets, "presets")
    cli.add_command(presets, "preset")
