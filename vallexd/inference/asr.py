"""Whisper speech recognition (openai-whisper, the reference's): recording -> (transcript, language).

Optional: the `whisper` package comes with the `vallexd[asr]` extra and is imported only when a
model is loaded.  Weights are one local `.pt` file in Whisper's own format (`{"dims": {...},
"model_state_dict": {...}}`, e.g. `medium.pt` fetched by `vallexctl models fetch --whisper`),
read with `torch.load(weights_only=True)`; nothing is ever downloaded here.

Decoding: one 30 s window (prompts are <= 15 s), language detected by Whisper unless given,
greedy (temperature 0) so the same recording always gives the same transcript, without
timestamps, at most SAMPLE_LEN tokens.  (The reference samples at temperature 1 with best_of=5;
greedy costs a fifth of that and is repeatable.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF

from vallexd.errors import NotFound, Unavailable
from vallexd.inference.weights import WeightsError, load_weights

WHISPER_RATE = 16_000
SAMPLE_LEN = 150  # the reference's sample_len: tokens of transcript at most


class WhisperWeightsError(WeightsError):
    reason_code = "BAD_WHISPER"


def import_whisper():  # type: ignore[no-untyped-def]
    """The `whisper` module, or Unavailable ASR_NOT_INSTALLED saying how to install it."""
    try:
        import whisper
    except ImportError:
        raise Unavailable(
            "transcription needs the openai-whisper package: install vallexd with the asr extra "
            "(pip install 'vallexd[asr]'), or pass the transcript yourself",
            reason="ASR_NOT_INSTALLED",
        ) from None
    return whisper


@dataclass(frozen=True)
class Transcript:
    text: str  # as Whisper wrote it (no punctuation rule applied yet)
    language: str  # Whisper's language code ("en", "zh", "ja", "de", ...)


class Transcriber:
    """A loaded Whisper model; `transcribe` is blocking (call it from one worker thread)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> Transcriber:
        """Raises NotFound WHISPER_NOT_FOUND, WhisperWeightsError, or Unavailable ASR_NOT_INSTALLED."""
        path = Path(path)
        whisper = import_whisper()
        if not path.is_file():
            raise NotFound(f"Whisper weights {str(path)!r} do not exist", reason="WHISPER_NOT_FOUND")
        checkpoint = load_weights(path, WhisperWeightsError, "Whisper checkpoint")
        dims, state = checkpoint.get("dims"), checkpoint.get("model_state_dict")
        if not isinstance(dims, dict) or not isinstance(state, dict):
            raise WhisperWeightsError("not a Whisper checkpoint (needs 'dims' and 'model_state_dict')",
                                      path=path)
        try:
            model = whisper.model.Whisper(whisper.model.ModelDimensions(**dims))
            model.load_state_dict(state, strict=True)
        except (TypeError, RuntimeError) as exc:
            raise WhisperWeightsError(f"not a usable Whisper checkpoint: {str(exc).splitlines()[0][:200]}",
                                      path=path) from None
        model.requires_grad_(False)
        model.eval().to(device)
        return cls(model, torch.device(device))

    @property
    def multilingual(self) -> bool:
        return bool(self.model.is_multilingual)

    @torch.inference_mode()
    def transcribe(self, samples: np.ndarray, sample_rate: int, language: str | None = None) -> Transcript:
        """Mono float samples at any rate -> what was said and in which language.

        `language` (a Whisper code) skips the detection; None lets Whisper detect it.
        """
        whisper = import_whisper()
        wav = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
        if sample_rate != WHISPER_RATE:
            wav = AF.resample(wav, int(sample_rate), WHISPER_RATE)
        wav = whisper.pad_or_trim(wav)
        mel = whisper.log_mel_spectrogram(wav, n_mels=self.model.dims.n_mels).to(self.device)
        options = whisper.DecodingOptions(
            task="transcribe", language=language if self.multilingual else "en", temperature=0.0,
            sample_len=SAMPLE_LEN, without_timestamps=True, fp16=False,  # weights are float32
        )
        result = whisper.decode(self.model, mel, options)
        return Transcript(text=str(result.text), language=str(result.language or language or "en"))
