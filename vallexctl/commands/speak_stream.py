"""What `vallexctl speak` needs for formats and `--stream`: the format of an output path, players
that read a stream on stdin, and the sinks that take the daemon's `audio` events as they come."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import IO, Any

import click

from vallexd.audio.formats import EXTENSIONS, FORMATS
from vallexd.constants import SAMPLE_RATE
from vallexd.errors import NotFound, ProtocolError

#: Output file extension -> format (an unknown extension keeps WAV, as before --format existed).
FORMAT_BY_EXTENSION = {".mp3": "mp3", ".opus": "opus", ".ogg": "opus", ".oga": "opus", ".aac": "aac",
                       ".flac": "flac", ".wav": "wav", ".pcm": "pcm", ".raw": "pcm"}
_RATE = str(SAMPLE_RATE)
#: Players that read the stream on stdin, tried in order: (program, arguments, formats it takes).
STREAM_PLAYERS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("paplay", ("--raw", "--format=s16le", f"--rate={_RATE}", "--channels=1"), ("pcm",)),
    ("aplay", ("-q", "-t", "raw", "-f", "S16_LE", "-r", _RATE, "-c", "1"), ("pcm",)),
    ("aplay", ("-q", "-t", "wav", "-"), ("wav",)),
    ("ffplay", ("-nodisp", "-autoexit", "-loglevel", "quiet", "-i", "pipe:0"),
     tuple(f for f in FORMATS if f != "pcm")),
)


def infer_format(output: Path | None, fmt: str | None) -> str:
    """--format if given, else from -o's extension, else wav; a clash of the two is a usage error."""
    by_name = FORMAT_BY_EXTENSION.get(output.suffix.lower()) if output is not None else None
    if fmt is not None and by_name is not None and by_name != fmt:
        raise click.UsageError(f"-o {output.name} names {by_name} audio but --format is {fmt}; "
                               f"drop --format or name the file .{EXTENSIONS[fmt]}")
    return fmt or by_name or "wav"


def find_stream_player(fmt: str | None) -> tuple[list[str], str]:
    """(command, format) of the first player on PATH that plays `fmt` from stdin; with fmt None
    (only playing) the format is the player's choice (raw pcm for paplay/aplay)."""
    for name, args, formats in STREAM_PLAYERS:
        exe = shutil.which(name)
        if exe and (fmt is None or fmt in formats):
            return [exe, *args], fmt or formats[0]
    wanted = f" {fmt}" if fmt else ""
    raise NotFound(
        f"no audio player on PATH can play a{wanted} stream from stdin (tried paplay, aplay, ffplay); "
        "install one (e.g. `apt install pulseaudio-utils`, `alsa-utils` or `ffmpeg`), or drop --stream",
        reason="NO_PLAYER",
    )


class StreamSinks:
    """Where the chunks of `audio` events go, in order: a file, stdout, a player started on the
    first chunk (so playback begins with the first piece). A player that exits early (the user
    closed it) stops receiving; the rest still goes to the file."""

    def __init__(self, *, file: IO[bytes] | None = None, stdout: IO[bytes] | None = None,
                 player: list[str] | None = None) -> None:
        self.file = file
        self.stdout = stdout
        self.player_cmd = player
        self.player: subprocess.Popen[bytes] | None = None
        self.chunks = 0
        self.bytes = 0

    def on_audio(self, data: dict[str, Any]) -> None:
        chunk = data.get("data")
        if not isinstance(chunk, (bytes, bytearray)):
            raise ProtocolError("an audio event without bytes", reason="BAD_EVENT")
        self.chunks += 1
        self.bytes += len(chunk)
        if not chunk:
            return
        for out in (self.file, self.stdout):
            if out is not None:
                out.write(chunk)
                out.flush()
        if self.player_cmd is not None and self.player is None:
            self.player = subprocess.Popen(self.player_cmd, stdin=subprocess.PIPE)
        if self.player is not None and self.player.stdin is not None:
            try:
                self.player.stdin.write(chunk)
                self.player.stdin.flush()
            except (BrokenPipeError, OSError):
                self.player.stdin = None  # closed by the user: keep going for the other sinks

    def close(self) -> int | None:
        """End the player's input and wait for it to finish playing; its exit status (None: none)."""
        if self.player is None:
            return None
        if self.player.stdin is not None:
            with contextlib.suppress(OSError):  # a player that already exited
                self.player.stdin.close()
        return self.player.wait()
