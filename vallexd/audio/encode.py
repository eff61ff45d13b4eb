"""Float audio -> mp3 / opus / aac / flac / wav / pcm bytes, whole or as a stream (torch-free).

One library for every format: PyAV (FFmpeg's libmp3lame, libopus, native aac and flac encoders and
its ogg/adts/mp3/flac muxers, plus the `atempo` filter for speed).  wav and pcm need no codec: they
are 16-bit PCM written here (`storage.wav` is the canonical cache form).

    enc = Encoder("opus", 24000, speed=1.0)     # streaming: bytes come out as audio goes in
    chunk = enc.feed(piece_audio)               # float32 mono samples -> bytes of the stream
    tail = enc.finish()                         # the last bytes; the stream is complete

`Encoder(..., streaming=False)` (and `encode_audio`) return everything from `finish()` into a
seekable buffer, so the muxers can write exact headers (FLAC STREAMINFO, the MP3 LAME/Xing tag with
its gapless delay, the RIFF sizes of a WAV).  A streamed WAV announces the largest length instead
(0xFFFFFFFF), which players treat as "until the end of the stream".
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction
from typing import Any

import numpy as np

from vallexd.audio.formats import CONTENT_TYPES, check_format, check_speed
from vallexd.constants import SAMPLE_RATE
from vallexd.storage.wav import SAMPLE_WIDTH, to_pcm16, wav_bytes

# format -> (FFmpeg muxer, encoder, muxer options)
_FFMPEG = {
    "mp3": ("mp3", "libmp3lame", {}),
    # An Ogg page goes out every 100 ms of audio (default 1 s), so a streamed piece does not sit in
    # the muxer; shorter pages cost ~27 bytes each (20 ms pages: +11 kbit/s).
    "opus": ("ogg", "libopus", {"page_duration": "100000"}),
    "aac": ("adts", "aac", {}),
    "flac": ("flac", "flac", {}),
}
_BITRATES = {"mp3": 64_000, "opus": 32_000, "aac": 64_000}  # mono speech at 24 kHz
# One atempo stage keeps its best quality within 0.5..2.0; further factors are chained.
_ATEMPO_MIN, _ATEMPO_MAX = 0.5, 2.0
_TEMPO_FRAME = 1024  # samples per frame pushed into atempo (~43 ms at 24 kHz)


def atempo_factors(speed: float) -> list[float]:
    """Split `speed` into atempo stages each within 0.5..2.0 whose product is `speed`."""
    factors = []
    while speed > _ATEMPO_MAX:
        factors.append(_ATEMPO_MAX)
        speed /= _ATEMPO_MAX
    while speed < _ATEMPO_MIN:
        factors.append(_ATEMPO_MIN)
        speed /= _ATEMPO_MIN
    factors.append(speed)
    return factors


def streaming_wav_header(sample_rate: int) -> bytes:
    """A 44-byte mono 16-bit RIFF header whose sizes say "unknown" (0xFFFFFFFF)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * SAMPLE_WIDTH, SAMPLE_WIDTH, 16)
            + b"data" + struct.pack("<I", unknown))


class _Sink:
    """A write-only file for PyAV: no seek, so muxers write as they go and never rewrite a header."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self.buffer)
        self.buffer.clear()
        return out


class _Tempo:
    """FFmpeg's atempo filter chain: tempo change without pitch change, float32 mono in and out."""

    def __init__(self, speed: float, sample_rate: int) -> None:
        import av.filter

        self.graph = av.filter.Graph()
        self.source = self.graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono",
                                             time_base=Fraction(1, sample_rate))
        node = self.source
        for factor in atempo_factors(speed):
            stage = self.graph.add("atempo", f"{factor:.6f}")
            node.link_to(stage)
            node = stage
        self.sink = self.graph.add("abuffersink")
        node.link_to(self.sink)
        self.graph.configure()

    def process(self, frame: Any) -> list[np.ndarray]:
        """Push one frame (None = end of stream) and return whatever audio is ready."""
        import av

        self.source.push(frame)
        out = []
        while True:
            try:
                result = self.sink.pull()
            except (av.BlockingIOError, av.EOFError):
                return out
            out.append(result.to_ndarray().reshape(-1).astype(np.float32, copy=False))


class Encoder:
    """Encode float mono audio into one `fmt` stream, incrementally.

    feed(samples) -> bytes: samples are float32 (nominally -1..1, clipped) at `sample_rate`; the
    bytes returned continue the stream (possibly empty: codecs and atempo hold a little audio
    back).  finish() -> bytes ends the stream; call it once.  With streaming=False, feed returns
    b"" and finish returns the whole file with exact headers.  Raises InvalidArgument for an
    unknown format or a speed outside 0.25..4.0.  Not thread-safe: use from one thread at a time.
    """

    def __init__(self, fmt: str, sample_rate: int = SAMPLE_RATE, *, speed: float = 1.0,
                 streaming: bool = True) -> None:
        self.format = check_format(fmt)
        self.speed = check_speed(speed)
        self.sample_rate = int(sample_rate)
        self.streaming = streaming
        self.content_type = CONTENT_TYPES[fmt]
        self.samples_out = 0  # samples handed to the codec (after the tempo change)
        self._finished = False
        self._tempo = _Tempo(self.speed, self.sample_rate) if self.speed != 1.0 else None
        self._pcm: list[bytes] = []  # wav/pcm kept whole until finish (non-streaming)
        self._header_sent = False
        self._pts = {"tempo": 0, "codec": 0}  # timestamps of the frames fed to each stage
        self._container: Any = None
        if fmt in _FFMPEG:
            import av

            muxer, codec, options = _FFMPEG[fmt]
            self._out: _Sink | io.BytesIO = _Sink() if streaming else io.BytesIO()
            self._container = av.open(self._out, mode="w", format=muxer, options=dict(options))
            self._stream = self._container.add_stream(codec, rate=self.sample_rate, layout="mono")
            if fmt in _BITRATES:
                self._stream.codec_context.bit_rate = _BITRATES[fmt]

    def feed(self, samples: np.ndarray) -> bytes:
        """Encode more audio; returns the stream bytes now ready (b"" when not streaming)."""
        if self._finished:
            raise RuntimeError("Encoder.feed after finish")
        # Clipped here for every format (FFmpeg's converters would wrap or saturate differently).
        audio = np.clip(np.nan_to_num(np.asarray(samples, dtype=np.float32).reshape(-1), nan=0.0,
                                      posinf=1.0, neginf=-1.0), -1.0, 1.0)
        if not audio.size:
            return b""
        if self._tempo is not None:
            # atempo answers each frame when the next one arrives: small frames keep that lag
            # to milliseconds instead of a whole piece.
            out: list[np.ndarray] = []
            for start in range(0, audio.size, _TEMPO_FRAME):
                out += self._tempo.process(self._frame(audio[start:start + _TEMPO_FRAME], "tempo"))
            return self._encode(out)
        return self._encode([audio])

    def finish(self) -> bytes:
        """Flush the tempo filter and codec, close the container; the remaining bytes."""
        if self._finished:
            raise RuntimeError("Encoder.finish called twice")
        tail = self._encode(self._tempo.process(None)) if self._tempo is not None else b""
        self._finished = True
        if self._container is None:
            if self.streaming:
                return tail + (b"" if self._header_sent or self.format == "pcm" else self._header())
            pcm = b"".join(self._pcm)
            if self.format == "pcm":
                return pcm
            samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767.0
            return wav_bytes(samples, self.sample_rate)
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        if isinstance(self._out, _Sink):
            return tail + self._out.take()
        return self._out.getvalue()

    # ------------------------------------------------------------------ internals
    def _frame(self, audio: np.ndarray, stage: str) -> Any:
        import av

        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio).reshape(1, -1), format="flt",
                                           layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts[stage]
        self._pts[stage] += audio.size
        return frame

    def _header(self) -> bytes:
        self._header_sent = True
        return streaming_wav_header(self.sample_rate)

    def _encode(self, chunks: list[np.ndarray]) -> bytes:
        out = []
        for audio in chunks:
            if not audio.size:
                continue
            self.samples_out += audio.size
            if self._container is None:
                pcm = to_pcm16(audio).tobytes()
                if not self.streaming:
                    self._pcm.append(pcm)
                    continue
                if self.format == "wav" and not self._header_sent:
                    out.append(self._header())
                out.append(pcm)
                continue
            # The tempo filter's frames carry their own timestamps; the codec gets a fresh count.
            for packet in self._stream.encode(self._frame(audio, "codec")):
                self._container.mux(packet)
        if isinstance(getattr(self, "_out", None), _Sink):
            out.append(self._out.take())  # type: ignore[union-attr]
        return b"".join(out)


def encode_audio(audio: np.ndarray, fmt: str, sample_rate: int = SAMPLE_RATE, *,
                 speed: float = 1.0) -> bytes:
    """A whole file of `audio` (float mono) in `fmt`, with exact headers."""
    encoder = Encoder(fmt, sample_rate, speed=speed, streaming=False)
    encoder.feed(audio)
    return encoder.finish()


def decode_wav_float(data: bytes) -> np.ndarray:
    """The float32 samples (-1..1) of a canonical mono 16-bit WAV (a cache entry)."""
    from vallexd.storage.wav import read_pcm16

    return read_pcm16(data).astype(np.float32) / 32767.0
