"""`vallexctl speak`: text in, WAV out (file, stdout, speakers, or just the cache path)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

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
from vallexd.constants import ACCENTS, REQUEST_LANGUAGES
from vallexd.errors import InvalidArgument, NotFound, ProtocolError

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
                 seed: int | None, top_k: int, temperature: float, want_audio: bool) -> dict[str, Any]:
    return {
        "text": text, "voice": voice, "language": language, "accent": accent,
        "long": "auto" if long is None else long, "seed": seed, "top_k": top_k,
        "temperature": temperature, "return": "audio" if want_audio else "path", "progress": True,
    }


@click.command()
@click.argument("text", required=False)
@click.option("-v", "--voice", metavar="NAME", help="Installed preset to speak with (see `presets list`).")
@click.option("-l", "--language", type=click.Choice(REQUEST_LANGUAGES), default="auto", show_default=True,
              help="Language of TEXT; mix expects [EN]..[EN] / [ZH]..[ZH] / [JA]..[JA] tags.")
@click.option("--accent", type=click.Choice(ACCENTS), default="native", show_default=True,
              help="native: each token in its own language; request: the text's language; or force one.")
@click.option("--long/--no-long", default=None,
              help="Split into sentences and speak them one by one [default: when the text is long].")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="Random seed, for repeatable output.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample from the k likeliest codes; 0 disables top-k.")
@click.option("--temperature", type=click.FloatRange(0.01, 10), default=1.0, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the WAV here (atomically).")
@click.option("--stdout", "to_stdout", is_flag=True,
              help="Write the WAV bytes to stdout (not to a terminal).")
@click.option("--play", is_flag=True, help="Play it (paplay, aplay, ffplay or afplay).")
@click.option("--progress/--no-progress", default=None,
              help="Show progress of long text on stderr [default: when stderr is a terminal].")
@json_option
def speak(text: str | None, voice: str | None, language: str, accent: str, long: bool | None,
          seed: int | None, top_k: int, temperature: float, output: Path | None, to_stdout: bool,
          play: bool, progress: bool | None) -> None:
    """Speak TEXT (or stdin) with vallexd.

    Without -o/--stdout/--play it prints where the daemon cached the WAV
    (path and URL of its static server).
    """
    st = state()
    as_json = st.json
    if to_stdout and as_json:
        raise click.UsageError("--stdout and --json both want stdout; pick one (or use -o FILE --json)")
    if to_stdout and output is not None:
        raise click.UsageError("use either -o FILE or --stdout")
    if to_stdout and sys.stdout.isatty():
        raise click.UsageError(
            "refusing to write WAV bytes to a terminal: redirect stdout (> file.wav) or use -o FILE"
        )
    player = find_player() if play else None  # fail before the (slow) synthesis, not after
    if output is not None:
        check_writable_dir(output)
    text = read_text(text)
    if not text:
        raise InvalidArgument("there is no text to speak", reason="EMPTY_TEXT")
    if voice is not None:
        from vallexd.service.requests import validate_name

        voice = validate_name(voice, "voice")

    want_audio = bool(output or to_stdout or play)
    params = speak_params(text, voice=voice, language=language, accent=accent, long=long, seed=seed,
                          top_k=top_k, temperature=temperature, want_audio=want_audio)
    show = ProgressLine("speaking", enabled=stderr_is_tty() if progress is None else progress, unit="pieces")

    def on_event(name: str, data: dict[str, Any]) -> None:
        total = int(data.get("total") or 0)
        if name == "progress" and total > 1:  # one piece is not worth a progress line
            show(int(data.get("done") or 0), total)


    with state().client() as c:
        result = c.call("synthesize", params, on_event=on_event)

    audio = result.pop("audio", None)
    if want_audio and not isinstance(audio, (bytes, bytearray)):
        raise ProtocolError("the daemon sent no audio", reason="NO_AUDIO")
    if output is not None:
        write_file_atomic(output, bytes(audio))  # type: ignore[arg-type]
        result["output"] = str(output.resolve())
    if to_stdout:
        out = click.get_binary_stream("stdout")
        out.write(bytes(audio))  # type: ignore[arg-type]
        out.flush()
    if player is not None:
        with tempfile.NamedTemporaryFile(suffix=".wav", prefix="vallexctl-") as tmp:
            tmp.write(bytes(audio))  # type: ignore[arg-type]
            tmp.flush()
            done = subprocess.run([*player, tmp.name], check=False)
        if done.returncode != 0:
            note(f"vallexctl: {Path(player[0]).name} exited with status {done.returncode}")

    if to_stdout:
        return  # stdout carries the WAV; nothing else may go there
    summary = (f"{result.get('duration_s', 0):.2f} s, {result.get('pieces', 1)} piece(s)"
               f"{', from cache' if result.get('cached') else ''}")
    if as_json:
        import json

        click.echo(json.dumps(result, ensure_ascii=False, sort_keys=True))
    elif output is not None:
        click.echo(f"{result['output']}  ({summary})")
    elif not play:
        emit(result, f"{result.get('path')}\n{result.get('url')}  ({summary})")


def register(cli: click.Group) -> None:
    cli.add_command(speak)
