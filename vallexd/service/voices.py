"""`presets.create`: a voice from a recording, made inside the daemon (docs/protocol.md).

    validate -> per-name lock -> exists? -> EnCodec (and Whisper) present? -> [voice thread] decode
    and check the audio, transcribe if no transcript -> [text thread] phonemize -> [voice thread]
    EnCodec -> atomic install (+ the recording with keep_audio)

Threads: EnCodec and Whisper run in one dedicated "vallexd-voice" thread, not in the model
worker, so making a voice never holds up synthesis for longer than its CPU share (measured in
bench/bench_voices.py); at most VOICE_QUEUE_LIMIT creates are admitted at once, more get BUSY.
The text front end runs in the service's single text thread, as for synthesis (OpenJTalk & co.
are not known to be thread-safe).  Both models are loaded on first use, in the voice thread.

Per-name lock: a second create of a name waits for the first, then finds the name taken
(ALREADY_EXISTS) unless it asked to overwrite; creates of different names run one after another
in the voice thread.  Nothing is written until the prompt is complete and valid, and then only
through atomic writes, so a failure at any step leaves no file behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from vallexd.config import Config
from vallexd.constants import LANGUAGES, MAX_PROMPT_SECONDS
from vallexd.errors import AlreadyExists, Busy, InvalidArgument, NotFound, TooLarge
from vallexd.service.requests import _bad_type, _bool, _params, required_bytes, required_name, validate_text
from vallexd.storage.presets import PresetStore
from vallexd.voices import maker
from vallexd.voices.audio import Recording, decode_audio

log = logging.getLogger(__name__)
T = TypeVar("T")

CREATE_FIELDS = ("name", "audio", "transcript", "language", "overwrite", "keep_audio")
PROMPT_LANGUAGES = ("auto", *LANGUAGES)
#: Creates admitted at once (running + waiting); each may hold a 10 MB upload in memory.
VOICE_QUEUE_LIMIT = 4


@dataclass(frozen=True)
class CreateRequest:
    name: str
    audio: bytes
    transcript: str | None = None  # None or blank: Whisper writes it
    language: str = "auto"  # en | zh | ja | auto
    overwrite: bool = False
    keep_audio: bool = False


def validate_create(params: Any, *, max_audio_bytes: int, max_text_chars: int) -> CreateRequest:
    """Check presets.create params; InvalidArgument / TooLarge (AUDIO_TOO_LARGE) name the field."""
    p = _params(params, CREATE_FIELDS)
    name = required_name(p)
    audio = required_bytes(p, "audio", "binary (the bytes of an audio file)")
    if len(audio) > max_audio_bytes:
        raise audio_too_large(len(audio), max_audio_bytes)
    transcript = p.get("transcript")
    if transcript is not None:
        if not isinstance(transcript, str):
            raise _bad_type("transcript", "a string", transcript)
        transcript = validate_text(transcript, max_text_chars) if transcript.strip() else None
    language = p.get("language", "auto")
    if language is None:
        language = "auto"
    if not isinstance(language, str):
        raise _bad_type("language", "a string", language)
    if language not in PROMPT_LANGUAGES:
        raise InvalidArgument(f"language must be one of {', '.join(PROMPT_LANGUAGES)}, got {language[:40]!r}",
                              reason="UNKNOWN_LANGUAGE",
                              details={"field": "language", "allowed": list(PROMPT_LANGUAGES)})
    return CreateRequest(name=name, audio=bytes(audio), transcript=transcript, language=language,
                         overwrite=_bool(p, "overwrite", False), keep_audio=_bool(p, "keep_audio", False))


def audio_too_large(size: int | None, limit: int) -> TooLarge:
    shown = f"of {size} bytes " if size is not None else ""
    return TooLarge(f"the recording {shown}is over the limit of {limit} bytes (send at most "
                    f"{MAX_PROMPT_SECONDS:.0f} s of audio)", reason="AUDIO_TOO_LARGE",
                    details={"field": "audio", "limit": limit})


class VoiceMaker:
    """Makes and installs voices; owns the voice thread and the lazily loaded EnCodec/Whisper."""

    def __init__(self, config: Config, presets: PresetStore, text_executor: Executor) -> None:
        self.config = config
        self.presets = presets
        self.models = maker.VoiceModels(config.encodec, config.whisper, device="cpu")
        self._text_executor = text_executor
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vallexd-voice")
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._admitted = 0
        self._last_transcription = 0.0  # time.monotonic() of the last use of Whisper
        self._idle_timer: asyncio.TimerHandle | None = None
        self.counters = {"created": 0, "transcribed": 0, "failed": 0}

    def shutdown(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _schedule_release(self) -> None:
        """Unload Whisper once it has not been used for `whisper_idle_s` (0: never)."""
        idle = self.config.whisper_idle_s
        if not idle:
            return
        self._last_transcription = time.monotonic()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(idle, self._release_if_idle, loop)

    def _release_if_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        self._idle_timer = None
        if self._admitted or time.monotonic() - self._last_transcription < self.config.whisper_idle_s:
            if self._admitted:  # busy now: look again after another idle period
                self._idle_timer = loop.call_later(self.config.whisper_idle_s, self._release_if_idle, loop)
            return
        # In the voice thread, so it can never pull the model from under a transcription.
        future = loop.run_in_executor(self._executor, self.models.release_whisper)
        future.add_done_callback(_log_release)

    def status(self) -> dict[str, Any]:
        return {"admitted": self._admitted, "limit": VOICE_QUEUE_LIMIT, **self.models.loaded,
                **self.counters}

    async def create(self, params: Any) -> dict[str, Any]:
        """Validate, make and install a voice. Returns the preset as presets.list describes it, plus
        transcript, transcribed (bool), audio_kept (bool) and timings (ms)."""
        req = validate_create(params, max_audio_bytes=self.config.max_audio_bytes,
                              max_text_chars=self.config.max_text_chars)
        if self._admitted >= VOICE_QUEUE_LIMIT:
            raise Busy(f"{VOICE_QUEUE_LIMIT} voices are being made; retry later", reason="QUEUE_FULL",
                       details={"queue_limit": VOICE_QUEUE_LIMIT})
        self._admitted += 1
        lock = self._lock_for(req.name)
        try:
            async with lock:
                return await self._create(req)
        except Exception:
            self.counters["failed"] += 1
            raise
        finally:
            self._admitted -= 1
            self._release(req.name)

    def _lock_for(self, name: str) -> asyncio.Lock:
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        return lock

    def _release(self, name: str) -> None:
        lock, users = self._locks[name]
        if users <= 1:
            del self._locks[name]
        else:
            self._locks[name] = (lock, users - 1)

    async def _in(self, executor: Executor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def _create(self, req: CreateRequest) -> dict[str, Any]:
        started = time.monotonic()
        if not req.overwrite:
            self._refuse_existing(req.name)
        # Preconditions before any slow work: the weights files are there.
        self.models.check_encodec()
        if req.transcript is None:
            self.models.check_whisper()
        recording = await self._in(self._executor, decode_audio, req.audio)
        decoded = time.monotonic()
        if req.transcript is None:
            try:
                heard, language = await self._in(self._executor, maker.transcribe, self.models, recording,
                                                 req.language)
            finally:
                self._schedule_release()
            text = await self._in(self._text_executor, lambda: maker.phonemize_transcript(
                heard, language, transcribed=True))
        else:
            text = await self._in(self._text_executor, maker.phonemize_transcript, req.transcript,
                                  req.language)
        heard_at = time.monotonic()
        codes = await self._in(self._executor, maker.encode, self.models, recording)
        encoded = time.monotonic()
        prompt = maker.build_prompt(codes, text, req.name)
        audio = (req.audio, recording.suffix) if req.keep_audio else None
        preset = await asyncio.to_thread(self.presets.install_prompt, req.name, prompt,
                                         overwrite=req.overwrite, audio=audio)
        self.counters["created"] += 1
        self.counters["transcribed"] += int(text.transcribed)
        log.info("voices: made %r from %.1f s of %s audio (%s, %s transcript)", req.name, recording.seconds,
                 recording.format, text.language, "Whisper" if text.transcribed else "given")
        return {
            **preset.describe(self.presets.install_dir),
            "transcript": text.transcript,
            "transcribed": text.transcribed,
            "audio_kept": audio is not None,
            "recording": _recording_info(recording),
            "timings": {"decode_ms": _ms(decoded - started), "text_ms": _ms(heard_at - decoded),
                        "encode_ms": _ms(encoded - heard_at), "total_ms": _ms(time.monotonic() - started)},
        }

    def _refuse_existing(self, name: str) -> None:
        try:
            self.presets.get(name)
        except NotFound:
            return
        raise AlreadyExists(f"voice {name!r} already exists; set overwrite to replace it",
                            reason="PRESET_EXISTS", details={"name": name})


def _log_release(future: asyncio.Future[bool]) -> None:
    if not future.cancelled() and future.exception() is None and future.result():
        log.info("voices: Whisper unloaded after being idle")


def _recording_info(recording: Recording) -> dict[str, Any]:
    return {"seconds": round(recording.seconds, 3), "sample_rate": recording.sample_rate,
            "channels": recording.channels, "format": recording.format}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
