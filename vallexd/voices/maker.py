"""Making a voice prompt from a recording: the steps shared by the daemon and `vallexctl`.

    decode_audio (voices.audio)  ->  [transcribe with Whisper]  ->  phonemize  ->  EnCodec  ->  Prompt

Each step is its own function because the daemon runs them in different threads (the text
front end only ever in its text thread; EnCodec and Whisper in the voice thread), while the
client calls `make_prompt` which chains them.  Torch-free at import: the models are loaded
on first use through `VoiceModels`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vallexd.constants import LANG_CODES, LANGUAGES
from vallexd.errors import InvalidArgument, Unavailable
from vallexd.storage.prompts import Prompt, validate_arrays
from vallexd.voices.audio import Recording, finish_transcript

NOT_CONFIGURED = Path("(not configured)")

#: Whisper language codes we can make a prompt for, and their names for messages.
WHISPER_LANGUAGES = {"en": "en", "zh": "zh", "ja": "ja"}


@dataclass(frozen=True)
class Text:
    """A transcript and what the front end made of it."""

    transcript: str
    language: str  # en | zh | ja
    ids: tuple[int, ...]
    transcribed: bool  # True when Whisper wrote it


def encodec_missing(path: Path) -> Unavailable:
    return Unavailable(
        f"this vallexd cannot make voices from recordings: the EnCodec weights are missing at {path}; "
        "fetch them with `vallexctl models fetch --encodec` (into the daemon's models folder, or set "
        "`encodec` in its configuration)",
        reason="ENCODEC_MISSING", details={"path": str(path)},
    )


def whisper_missing(path: Path) -> Unavailable:
    return Unavailable(
        f"no transcript was given and the Whisper weights are missing at {path}; pass the transcript, "
        "or fetch Whisper with `vallexctl models fetch --whisper` (into the daemon's models folder, "
        "or set `whisper` in its configuration)",
        reason="WHISPER_MISSING", details={"path": str(path)},
    )


class VoiceModels:
    """EnCodec and Whisper, each loaded on first use (never at import or daemon start).

    Blocking; the daemon calls it from its one voice thread only. The lock makes a second
    caller (the client, tests) safe too.
    """

    def __init__(self, encodec_path: Path | None, whisper_path: Path | None, device: str = "cpu") -> None:
        self.encodec_path = Path(encodec_path) if encodec_path is not None else NOT_CONFIGURED
        self.whisper_path = Path(whisper_path) if whisper_path is not None else None
        self.device = device
        self._tokenizer: Any = None
        self._transcriber: Any = None
        self._lock = threading.Lock()

    def check_encodec(self) -> None:
        """Cheap precondition: Unavailable ENCODEC_MISSING unless the weights file is there."""
        if self._tokenizer is None and not self.encodec_path.is_file():
            raise encodec_missing(self.encodec_path)

    def check_whisper(self) -> None:
        if self._transcriber is None and (self.whisper_path is None or not self.whisper_path.is_file()):
            raise whisper_missing(self.whisper_path or NOT_CONFIGURED)
        if self._transcriber is None:
            from vallexd.inference.asr import import_whisper

            import_whisper()  # Unavailable ASR_NOT_INSTALLED before any work is done

    def tokenizer(self) -> Any:
        """The loaded `AudioTokenizer` (EnCodec)."""
        with self._lock:
            if self._tokenizer is None:
                self.check_encodec()
                from vallexd.inference.encodec import AudioTokenizer

                self._tokenizer = AudioTokenizer.load(self.encodec_path, device=self.device)
            return self._tokenizer

    def transcriber(self) -> Any:
        """The loaded `Transcriber` (Whisper)."""
        with self._lock:
            if self._transcriber is None:
                self.check_whisper()
                from vallexd.inference.asr import Transcriber

                assert self.whisper_path is not None
                self._transcriber = Transcriber.load(self.whisper_path, device=self.device)
            return self._transcriber

    def release_whisper(self) -> bool:
        """Drop the loaded Whisper (it is loaded again on next use); True if one was loaded."""
        with self._lock:
            released, self._transcriber = self._transcriber is not None, None
        if released:
            import gc

            gc.collect()  # the model's tensors are freed now, not at some later collection
        return released

    @property
    def loaded(self) -> dict[str, bool]:
        return {"encodec": self._tokenizer is not None, "whisper": self._transcriber is not None}


def transcribe(models: VoiceModels, recording: Recording, language: str | None) -> tuple[str, str]:
    """Whisper's transcript (with the final-punctuation rule) and language (en/zh/ja).

    `language` None or "auto" lets Whisper detect it; another language than en/zh/ja is refused
    with InvalidArgument UNSUPPORTED_LANGUAGE (pass the transcript and language to override).
    """
    hint = None if language in (None, "auto") else language
    heard = models.transcriber().transcribe(recording.samples, recording.sample_rate, hint)
    if heard.language not in WHISPER_LANGUAGES:
        raise InvalidArgument(
            f"Whisper hears the language {heard.language!r} in the recording; a voice prompt must be "
            "English (en), Chinese (zh) or Japanese (ja). If that is wrong, pass the transcript and "
            "the language yourself", reason="UNSUPPORTED_LANGUAGE",
            details={"field": "audio", "detected": heard.language},
        )
    return finish_transcript(heard.text), WHISPER_LANGUAGES[heard.language]


def phonemize_transcript(transcript: str, language: str, *, transcribed: bool = False) -> Text:
    """The transcript's phoneme ids; its language must come out as one of en/zh/ja (not mixed)."""
    from vallexd.text import phonemize

    ph = phonemize(transcript, language)
    if ph.language not in LANGUAGES:
        raise InvalidArgument(
            f"the transcript reads as {ph.language!r}; a prompt has one language: "
            "pass language en, zh or ja", reason="BAD_PROMPT_LANGUAGE", details={"field": "language"},
        )
    return Text(transcript, ph.language, tuple(ph.ids), transcribed)


def encode(models: VoiceModels, recording: Recording) -> np.ndarray:
    """EnCodec codes (1, T, 8) int64 of the recording (resampled to 24 kHz)."""
    return models.tokenizer().encode(recording.samples, recording.sample_rate)


def build_prompt(codes: np.ndarray, text: Text, name: str) -> Prompt:
    return validate_arrays(codes, np.asarray([text.ids], dtype=np.int64),
                           np.asarray(LANG_CODES[text.language]), name)


def make_prompt(models: VoiceModels, recording: Recording, transcript: str | None, language: str,
                name: str) -> tuple[Prompt, Text]:
    """All steps in this thread (the client's path): Whisper when `transcript` is empty."""
    models.check_encodec()  # fail before any slow work
    if transcript and transcript.strip():
        text = phonemize_transcript(transcript, language)
    else:
        heard, lang = transcribe(models, recording, language)
        text = phonemize_transcript(heard, lang, transcribed=True)
    return build_prompt(encode(models, recording), text, name), text
