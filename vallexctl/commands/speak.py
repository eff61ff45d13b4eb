"""`vallexctl speak`: text in, audio out (file, stdout, speakers, or just the cache path).

WAV unless --format (or -o's extension) asks for mp3/opus/aac/flac/pcm; --stream writes and plays
the audio as the daemon sends it, piece by piece (vallexctl/commands/speak_stream.py).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from vallexctl.client import Client, EventHandler
from vallexctl.commands.speak_stream import StreamSinks, find_stream_player, infer_format
from vallexctl.context import state
from vallexctl.output import (
    ProgressLine,
    check_writable_dir,
    emit,
    json_option,
    note,
    stderr_is_tty,
    write_file_atomic,
)
from vallexd.audio.formats import EXTENSIONS, FORMATS
from vallexd.constants import ACCENTS, MAX_TOP_K, REQUEST_LANGUAGES
from vallexd.errors import InvalidArgument, NotFound, ProtocolError, Unavailable, VallexError
from vallexd.storage.fsutil import atomic_open

# Players tried in order; each gets the WAV path as its last argument.
PLAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("paplay", ()),
    ("aplay", ("-q",)),
    ("ffplay", ("-nodisp", "-autoexit", "-loglevel", "quiet")),
    ("afplay", ()),
)


def find_player() -> list[str]:
    for name, args in PLAYERS:
        exe = shutil.which(name)
        if exe:
            return [exe, *args]
    raise NotFound(
        "no audio player found on PATH (tried paplay, aplay, ffplay, afplay); install one "
        "(e.g. `apt install pulseaudio-utils` or `alsa-utils`) or write a file with -o",
        reason="NO_PLAYER",
    )


def read_text(text: str | None) -> str:
    if text is not None and text != "-":
        return text
    stdin = sys.stdin
    if stdin is None or stdin.isatty():
        raise click.UsageError("give the TEXT to speak as an argument, or pipe it on stdin")
    return stdin.read().strip()


def speak_params(text: str, *, voice: str | None, language: str, accent: str, long: bool | None,
                 seed: int | None, top_k: int, temperature: float, want_audio: bool,
                 long_mode: str | None = None) -> dict[str, Any]:
    params = {
        "text": text, "voice": voice, "language": language, "accent": accent,
        "long": "auto" if long is None else long, "seed": seed, "top_k": top_k,
        "temperature": temperature, "return": "audio" if want_audio else "path", "progress": True,
    }
    if long_mode is not None:
        params["long_mode"] = long_mode
    return params


#: How long `speak` waits for a daemon that is still loading its model, unless --timeout says.
MODEL_WAIT_S = 300.0


def call_when_ready(client: Client, method: str, params: dict[str, Any], *,
                    on_event: EventHandler | None = None) -> dict[str, Any]:
    """`client.call`, but a daemon still loading its model is waited for (with a note) and asked again.

    Waits up to the global --timeout, else MODEL_WAIT_S; then Unavailable MODEL_LOADING (exit 5).
    """
    try:
        return client.call(method, params, on_event=on_event)
    except Unavailable as exc:
        if exc.reason != "MODEL_LOADING":
            raise
    wait_s = state().timeout or MODEL_WAIT_S
    client.wait_ready(wait_s, on_wait=lambda: note(
        f"vallexctl: vallexd is loading its model; waiting up to {wait_s:g} s ..."))
    return client.call(method, params, on_event=on_event)


@click.command()
@click.argument("text", required=False)
@click.option("-v", "--voice", metavar="NAME", help="Installed preset to speak with (see `presets list`).")
@click.option("-l", "--language", type=click.Choice(REQUEST_LANGUAGES), default="auto", show_default=True,
              help="Language of TEXT; mix expects [EN]..[EN] / [ZH]..[ZH] / [JA]..[JA] tags.")
@click.option("--accent", type=click.Choice(ACCENTS), default="native", show_default=True,
              help="native: each token in its own language; request: the text's language; or force one.")
@click.option("--long/--no-long", default=None,
              help="Split into sentences and speak them one by one [default: when the text is long].")
@click.option("--long-mode", type=click.Choice(["fixed", "sliding"]), default=None,
              help="How pieces of a long text are prompted: fixed = each by the voice; sliding = on a coin "
                   "by the piece just spoken [default: fixed with --voice, sliding without].")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="Random seed, for repeatable output.")
@click.option("--fresh", is_flag=True,
              help="A new take: run the model even when the cache has this request (the new WAV "
                   "replaces the cached one).")
@click.option("--top-k", type=click.IntRange(min=0, max=MAX_TOP_K), default=0, show_default=True,
              help=f"Sample from the k likeliest codes (at most {MAX_TOP_K}, the codebook size); 0 disables "
                   "top-k; 1 is greedy.")
@click.option("--temperature", type=click.FloatRange(0.01, 10), default=1.0, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the audio here (atomically); its extension picks the format.")
@click.option("--stdout", "to_stdout", is_flag=True,
              help="Write the audio bytes to stdout (not to a terminal).")
@click.option("--play", is_flag=True, help="Play it (paplay, aplay, ffplay or afplay).")
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS),
              help="Audio format [default: from -o's extension (.mp3 .opus .ogg .aac .flac .wav .pcm), "
                   "else wav].")
@click.option("--stream", is_flag=True,
              help="Write/play the audio as each piece is ready: --play starts with the first piece; "
                   "-o still appears only when complete.")
@click.option("--progress/--no-progress", default=None,
              help="Show progress of long text on stderr [default: when stderr is a terminal].")
@json_option
def speak(text: str | None, voice: str | None, language: str, accent: str, long: bool | None,
          long_mode: str | None, seed: int | None, fresh: bool, top_k: int, temperature: float,
          output: Path | None, to_stdout: bool, play: bool, fmt: str | None, stream: bool,
          progress: bool | None) -> None:
    """Speak TEXT (or stdin) with vallexd.

    Without -o/--stdout/--play it prints where the daemon cached the WAV
    (path and URL of its static server). A daemon still loading its model is
    waited for (up to --timeout, default 300 s).
    """
    _check_destinations(output, to_stdout)
    if stream and not (output or to_stdout or play):
        raise click.UsageError("--stream needs somewhere to send the audio: -o FILE, --stdout or --play")
    fmt = infer_format(output, fmt)
    player, fmt = _find_player(play, stream, fmt, output, to_stdout)  # before the (slow) synthesis
    text, voice = _read_checked_text(text, voice)
    want_audio = bool(output or to_stdout or play)
    params = speak_params(text, voice=voice, language=language, accent=accent, long=long, seed=seed,
                          top_k=top_k, temperature=temperature, want_audio=want_audio, long_mode=long_mode)
    if fresh:
        params["fresh"] = True
    if fmt != "wav":
        params["format"] = fmt
    if stream:
        params["stream"] = True
        result = _speak_streamed(params, progress, output, to_stdout, player)
    else:
        result = _synthesize(params, progress)
        audio = result.pop("audio", None)
        if want_audio and not isinstance(audio, (bytes, bytearray)):
            raise ProtocolError("the daemon sent no audio", reason="NO_AUDIO")
        _deliver(bytes(audio or b""), result, output=output, to_stdout=to_stdout, player=player, fmt=fmt)
    if not to_stdout:  # stdout carries the audio; nothing else may go there
        _report(result, output=output, play=play)


def _find_player(play: bool, stream: bool, fmt: str, output: Path | None,
                 to_stdout: bool) -> tuple[list[str] | None, str]:
    """The player command (None without --play) and the format to ask for."""
    if not play:
        return None, fmt
    if stream:
        # Only playing: let the player pick what it reads best (raw pcm for paplay/aplay).
        return find_stream_player(None if output is None and not to_stdout and fmt == "wav" else fmt)
    return find_player(), fmt


def _check_destinations(output: Path | None, to_stdout: bool) -> None:
    """Refuse impossible output combinations before any work (usage errors, exit 2)."""
    if to_stdout and state().json:
        raise click.UsageError("--stdout and --json both want stdout; pick one (or use -o FILE --json)")
    if to_stdout and output is not None:
        raise click.UsageError("use either -o FILE or --stdout")
    if to_stdout and sys.stdout.isatty():
        raise click.UsageError(
            "refusing to write WAV bytes to a terminal: redirect stdout (> file.wav) or use -o FILE"
        )
    if output is not None:
        check_writable_dir(output)


def _read_checked_text(text: str | None, voice: str | None) -> tuple[str, str | None]:
    """The text to speak (argument or stdin), non-empty, and the voice name (NFC) if it is a name."""
    text = read_text(text)
    if not text:
        raise InvalidArgument("there is no text to speak", reason="EMPTY_TEXT")
    if voice is not None:
        from vallexd.service.requests import validate_name

        voice = validate_name(voice, "voice")
    return text, voice


def _progress_events(progress: bool | None) -> EventHandler:
    """An event handler that draws a progress line for long text on stderr."""
    show = ProgressLine("speaking", enabled=stderr_is_tty() if progress is None else progress, unit="pieces")

    def on_event(name: str, data: dict[str, Any]) -> None:
        total = int(data.get("total") or 0)
        if name == "progress" and total > 1:  # one piece is not worth a progress line
            show(int(data.get("done") or 0), total)

    return on_event


def _synthesize(params: dict[str, Any], progress: bool | None) -> dict[str, Any]:
    """Ask the daemon (waiting for a model that still loads), with a progress line for long text."""
    with state().client() as c:
        return call_when_ready(c, "synthesize", params, on_event=_progress_events(progress))


def _speak_streamed(params: dict[str, Any], progress: bool | None, output: Path | None, to_stdout: bool,
                    player: list[str] | None) -> dict[str, Any]:
    """synthesize with stream: true; each `audio` event's bytes go to the file, stdout and player
    at once. The file is a temp file beside -o, renamed over it only once the audio is complete."""
    on_event = _progress_events(progress)
    with contextlib.ExitStack() as stack:
        file = stack.enter_context(atomic_open(output, mode=None, suffix=".part")) if output else None
        sinks = StreamSinks(file=file, stdout=click.get_binary_stream("stdout") if to_stdout else None,
                            player=player)

        def on_stream_event(name: str, data: dict[str, Any]) -> None:
            if name == "audio":
                sinks.on_audio(data)
            else:
                on_event(name, data)

        try:
            with state().client() as c:
                result = call_when_ready(c, "synthesize", params, on_event=on_stream_event)
        finally:
            status = sinks.close()
        if status:
            assert player is not None
            raise VallexError(f"{Path(player[0]).name} exited with status {status}; check the audio "
                              "device, or write a file with -o FILE", reason="PLAYER_FAILED")
        if not sinks.chunks:
            raise ProtocolError("the daemon sent no audio events", reason="NO_AUDIO")
    if output is not None:
        result["output"] = str(output.resolve())
    return result


def _deliver(audio: bytes, result: dict[str, Any], *, output: Path | None, to_stdout: bool,
             player: list[str] | None, fmt: str) -> None:
    """Write the audio to the file, stdout and/or the player; a failing player is an error (exit 1)."""
    if output is not None:
        write_file_atomic(output, audio)
        result["output"] = str(output.resolve())
    if to_stdout:
        out = click.get_binary_stream("stdout")
        out.write(audio)
        out.flush()
    if player is not None:
        with tempfile.NamedTemporaryFile(suffix=f".{EXTENSIONS[fmt]}", prefix="vallexctl-") as tmp:
            tmp.write(audio)
            tmp.flush()
            done = subprocess.run([*player, tmp.name], check=False)
        if done.returncode != 0:
            where = f"; the WAV is at {result['path']}" if result.get("path") else ""
            raise VallexError(
                f"{Path(player[0]).name} exited with status {done.returncode}{where}; check the audio "
                "device, or write a file with -o FILE", reason="PLAYER_FAILED")


def _report(result: dict[str, Any], *, output: Path | None, play: bool) -> None:
    """The human line (path, URL when the static server runs, duration) or the JSON result."""
    summary = (f"{result.get('duration_s', 0):.2f} s, {result.get('pieces', 1)} piece(s)"
               f"{', from cache' if result.get('cached') else ''}")
    if state().json:
        import json

        click.echo(json.dumps(result, ensure_ascii=False, sort_keys=True))
    elif output is not None:
        click.echo(f"{result['output']}  ({summary})")
    elif not play:
        where = [str(result.get("path"))] if result.get("path") else []
        where.append(f"{result['url']}  ({summary})" if result.get("url") else f"({summary})")
        emit(result, "\n".join(where))


def register(cli: click.Group) -> None:
    cli.add_command(speak)
