"""Decode an uploaded recording (any common format) and check it is fit to be a voice prompt.

Torch-free: numpy plus PyAV (FFmpeg) for decoding, with soundfile as the fallback when PyAV is
not installed.  Everything works on bytes in memory: no temporary file is ever written.

Checks, each a typed error that names the problem (the same on the client and the daemon):

- not audio / unreadable / a container we do not accept   INVALID_ARGUMENT  BAD_AUDIO
- empty                                                  INVALID_ARGUMENT  EMPTY_AUDIO
- longer than `max_seconds` (15 s)                         TOO_LARGE         PROMPT_TOO_LONG
- clipped (more than 0.1 % of samples at full scale)      INVALID_ARGUMENT  CLIPPED_AUDIO
- near-silent (RMS under -50 dBFS)                         INVALID_ARGUMENT  SILENT_AUDIO

Several channels are mixed down to mono (their mean, as the reference does); resampling to the
model's rate happens at encoding time (`vallexd.inference.encodec.to_mono_24k`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vallexd.constants import MAX_PROMPT_SECONDS
from vallexd.errors import InvalidArgument, TooLarge

#: Containers PyAV may open for an upload. FFmpeg can parse far more (playlists, images, network
#: protocols via concat/hls); an upload gets only the formats people record voices in.
ALLOWED_FORMATS = frozenset({
    "wav", "w64", "flac", "ogg", "mp3", "mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm",
    "aiff", "caf", "au",
})
#: A sample at or above this magnitude (of full scale) counts as clipped.
CLIP_LEVEL = 0.999
#: Refused when more than this fraction of the samples is clipped (0.1 %: a few isolated peaks pass).
CLIP_FRACTION = 0.001
#: Refused below this RMS level (dBFS): a room with nobody speaking is around -60..-50.
SILENCE_DBFS = -50.0
#: Audio suffix kept beside a preset with keep_audio, by container format.
SUFFIX_FOR_FORMAT = {"wav": ".wav", "w64": ".w64", "flac": ".flac", "ogg": ".ogg", "mp3": ".mp3",
                     "mov": ".m4a", "mp4": ".m4a", "m4a": ".m4a", "3gp": ".3gp", "3g2": ".3g2",
                     "mj2": ".mj2", "matroska": ".mka", "webm": ".webm", "aiff": ".aiff", "caf": ".caf",
                     "au": ".au"}
KEPT_AUDIO_SUFFIXES = tuple(sorted(set(SUFFIX_FOR_FORMAT.values())))


@dataclass(frozen=True)
class Recording:
    """A decoded recording: `samples` (frames,) float32 mono in [-1, 1], at `sample_rate` Hz."""

    samples: np.ndarray
    sample_rate: int
    channels: int  # before the mix-down
    format: str  # container format name ("wav", "flac", "mp3", ...)

    @property
    def seconds(self) -> float:
        return self.samples.shape[0] / self.sample_rate

    @property
    def suffix(self) -> str:
        return SUFFIX_FOR_FORMAT.get(self.format, ".audio")


def _bad(message: str, reason: str = "BAD_AUDIO") -> InvalidArgument:
    return InvalidArgument(message, reason=reason, details={"field": "audio"})


def too_long(seconds: float | None, max_seconds: float) -> TooLarge:
    """PROMPT_TOO_LONG; `seconds` None when decoding stopped at the limit and the file does not
    say its length (then the message says "longer than", never the cut-off length)."""
    length = f"{seconds:.1f} s long" if seconds is not None else f"longer than {max_seconds:.0f} s"
    return TooLarge(
        f"the recording is {length}; a voice prompt may be at most {max_seconds:.0f} s "
        "(cut a clean 3-10 s sentence out of it)",
        reason="PROMPT_TOO_LONG", details={"field": "audio", "limit": max_seconds,
                                           **({"seconds": round(seconds, 2)} if seconds is not None else {})},
    )


def decode_audio(data: bytes, *, max_seconds: float = MAX_PROMPT_SECONDS) -> Recording:
    """Bytes of a WAV/FLAC/OGG/MP3/M4A/WebM... file -> a mono `Recording`, checked (see module doc).

    Stops decoding as soon as the audio runs past `max_seconds`, so a long upload costs little.
    """
    if not data:
        raise _bad("the audio is empty", "EMPTY_AUDIO")
    try:
        import av  # noqa: F401
    except ImportError:  # pragma: no cover - PyAV is a dependency; soundfile covers WAV/FLAC/OGG
        frames, rate, channels, fmt = _decode_soundfile(data, max_seconds)
    else:
        frames, rate, channels, fmt = _decode_av(data, max_seconds)
    mono = frames.mean(axis=0) if frames.shape[0] > 1 else frames[0]
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if mono.size == 0:
        raise _bad("the recording holds no audio samples", "EMPTY_AUDIO")
    if mono.shape[0] / rate > max_seconds:
        raise too_long(mono.shape[0] / rate, max_seconds)
    if not np.isfinite(mono).all():
        raise _bad("the recording contains NaN or infinite samples")
    return Recording(check_levels(mono), rate, channels, fmt)


def check_levels(mono: np.ndarray) -> np.ndarray:
    """Refuse a clipped or near-silent recording (mono float samples, full scale 1.0).

    Returns the samples, scaled down to a peak of 1.0 if they exceed it (float files can without
    being clipped; the reference's make_prompt normalises them the same way before EnCodec).
    """
    peak = float(np.max(np.abs(mono)))
    if peak > 1.0:
        mono = (mono / peak).astype(np.float32)
    clipped = float(np.mean(np.abs(mono) >= CLIP_LEVEL))
    if clipped > CLIP_FRACTION:
        raise _bad(
            f"the recording is clipped ({clipped:.1%} of the samples at full scale): record it again "
            "a little quieter", "CLIPPED_AUDIO")
    rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
    level = 20 * math.log10(rms) if rms > 0 else -math.inf
    if level < SILENCE_DBFS:
        shown = "-inf" if level == -math.inf else f"{level:.0f}"
        raise _bad(
            f"the recording is near-silent (RMS {shown} dBFS, below {SILENCE_DBFS:.0f}): nobody "
            "can be heard in it", "SILENT_AUDIO")
    return mono


def _decode_av(data: bytes, max_seconds: float) -> tuple[np.ndarray, int, int, str]:
    """(channels, frames) float32, rate, channel count, format name, with PyAV."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, ValueError, OSError) as exc:  # type: ignore[attr-defined]
        raise _bad(f"not an audio file we can read ({_first_line(exc)})") from None
    with container:
        names = set(container.format.name.split(","))
        if not names & ALLOWED_FORMATS:
            raise _bad(f"audio format {container.format.name!r} is not accepted; send WAV, FLAC, OGG, "
                       "MP3, M4A or WebM")
        fmt = sorted(names & ALLOWED_FORMATS)[0]
        streams = container.streams.audio
        if not streams:
            raise _bad("the file has no audio stream")
        stream = streams[0]
        rate = int(stream.rate or stream.codec_context.sample_rate or 0)
        if rate <= 0:
            raise _bad("the audio stream has no sample rate")
        limit = int(max_seconds * rate) + 1
        chunks: list[np.ndarray] = []
        got = 0
        resampler = None
        try:
            for frame in container.decode(stream):
                if resampler is None:
                    # Planar float at the stream's own rate and layout: (channels, n) arrays.
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=frame.rate)
                for out in resampler.resample(frame):
                    arr = out.to_ndarray()
                    chunks.append(arr)
                    got += arr.shape[1]
                if got > limit:  # stop decoding here: say the file's own length if it knows it
                    raise too_long(_stated_seconds(container, stream), max_seconds)
        except av.error.FFmpegError as exc:  # type: ignore[attr-defined]
            raise _bad(f"the audio is damaged ({_first_line(exc)})") from None
    if not chunks:
        raise _bad("the recording holds no audio samples", "EMPTY_AUDIO")
    channels = max(c.shape[0] for c in chunks)
    if any(c.shape[0] != channels for c in chunks):
        raise _bad("the channel layout changes in the middle of the recording")
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), rate, channels, fmt


def _stated_seconds(container: Any, stream: Any) -> float | None:
    """The length the container or stream header states, in seconds (None if neither does)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE: microseconds
    return None


def _decode_soundfile(data: bytes, max_seconds: float) -> tuple[np.ndarray, int, int, str]:
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
        if info.samplerate and info.frames / info.samplerate > max_seconds:
            raise too_long(info.frames / info.samplerate, max_seconds)
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise _bad(f"not an audio file we can read ({_first_line(exc)})") from None
    return audio.T, int(rate), int(audio.shape[1]), info.format.lower()


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


#: The reference's rule (make_prompt.transcribe_one): a transcript ending without one of these
#: gets a "." appended, so the prompt's text ends like a sentence.
FINAL_PUNCTUATION = "?!.,。，？！。、"


def finish_transcript(text: str) -> str:
    """The reference's final-punctuation rule: append "." unless the text ends in one of
    FINAL_PUNCTUATION (spaces ignored). Raises InvalidArgument NO_SPEECH for an empty text."""
    stripped = text.strip()
    if not stripped:
        raise InvalidArgument("Whisper heard no speech in the recording; pass the transcript yourself",
                              reason="NO_SPEECH", details={"field": "transcript"})
    return stripped if stripped[-1] in FINAL_PUNCTUATION else stripped + "."
